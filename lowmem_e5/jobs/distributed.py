"""Scale-out on Ray Data (the optional extra `[ray]`; the core never imports this module).

One Ray Data pipeline: a read stage turns each pending input shard into rows (id, text, shard) with the same reader
as the single-machine path; `map_batches` sends batches of texts to a pool of actors (`ActorPoolStrategy`), each
holding one `Embedder` loaded once, which return ids and vectors; Ray Data's Parquet writer writes them, partitioned
by shard, under the output's staging folder. Ray Data restarts a dead actor and retries its batches (its defaults,
kept); a committer thread in the driver moves each shard into place once it holds every id of its input exactly
once and marks it finished in the manifest, so a killed driver resumes from the shards already done.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path

from .corpus import Corpus, Shard, read_shard
from .corpus_job import CorpusSummary, EmbedSettings
from .manifest import Manifest
from .vector_shards import PARTITION, id_array, vector_table

RAY_EXTRA = "pip install 'lowmem-e5[ray]'"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        from ..errors import LowmemError

        raise LowmemError(f"--ray needs Ray Data, which is not installed; install the extra: {RAY_EXTRA}") from None
    return ray


def read_shard_rows(batch: dict, text_field: str, id_field: str | None):
    """Read stage: one row per shard in, that shard's rows (id, text, shard) out."""
    import pyarrow as pa

    tables = []
    for path, name, sha, rows, first in zip(batch["path"], batch["name"], batch["sha256"], batch["rows"],
                                            batch["first_row"]):
        shard = Shard(path=Path(str(path)), name=str(name), sha256=str(sha), rows=int(rows),
                      first_row=int(first))
        got = read_shard(shard, text_field, id_field)
        tables.append(pa.table({"id": id_array(got.ids), "text": pa.array(got.texts, type=pa.string()),
                                PARTITION: pa.array([shard.name] * len(got.ids), type=pa.string())}))
    return pa.concat_tables(tables)


class RunEvents:
    """A small actor the workers report to: model load times, restarts, tokens computed."""

    def __init__(self) -> None:
        self.loads: list[float] = []
        self.restarts = 0
        self.tokens = [0, 0, 0, 0]  # real, padded, batches, truncated texts

    def loaded(self, seconds: float, restarted: bool) -> None:
        self.loads.append(seconds)
        self.restarts += int(restarted)

    def encoded(self, real: int, padded: int, batches: int, truncated: int) -> None:
        for i, v in enumerate((real, padded, batches, truncated)):
            self.tokens[i] += v

    def report(self) -> dict:
        return {"loads": self.loads, "restarts": self.restarts, "tokens": self.tokens}


class EmbedWorker:
    """The callable class of `map_batches`: one Embedder per actor, texts in, ids + vectors out."""

    def __init__(self, config: dict, settings: dict, events=None, threads: int | None = None) -> None:
        import warnings

        import ray
        import torch

        from ..runtime.config import RuntimeConfig
        from ..runtime.encoder import Embedder
        from ..runtime.loading import load_model

        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)  # Ray sets 1 thread for a fractional CPU share; use the worker's cores
        self.settings = EmbedSettings(**settings)
        self.embedder = Embedder(load_model(RuntimeConfig.from_dict(config)))
        self.settings.prepare(self.embedder)
        self.events = events
        if events is not None:
            with warnings.catch_warnings():  # Ray's own property reads a deprecated one inside
                warnings.simplefilter("ignore")
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
            ray.get(events.loaded.remote(time.perf_counter() - t0, restarted))

    def __call__(self, batch: dict):
        import pyarrow as pa

        texts = [str(t) for t in batch["text"]]
        vectors, stats = self.settings.encode(self.embedder, texts)
        table = vector_table(batch["id"].tolist(), self.settings.store(vectors))
        if self.events is not None:
            self.events.encoded.remote(stats.real_tokens, stats.padded_tokens, stats.n_batches, stats.n_truncated)
        return table.append_column(PARTITION, pa.array([str(s) for s in batch[PARTITION]], type=pa.string()))


def cluster_gpu_bytes(ray) -> int | None:
    """Memory of one of the cluster's GPUs (probed by a task that holds one), or None without GPUs."""
    if not ray.cluster_resources().get("GPU"):
        return None

    def probe() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(ray.remote(num_gpus=1)(probe).remote())


def replicas_per_gpu(gpu_bytes: int, replica_bytes: int) -> int:
    replicas = gpu_bytes // replica_bytes
    if replicas < 1:
        from ..errors import LowmemError

        raise LowmemError(f"one replica needs {replica_bytes / 2**30:.2f} GiB (weights + activations at the token "
                          f"budget) but the cluster's GPUs have {gpu_bytes / 2**30:.2f} GiB; lower --token-budget or "
                          "use a smaller --quant")
    return replicas


def gpus_per_worker_auto(ray, replica_bytes, log) -> float:
    """The GPU share per worker: 1 / (replicas that fit one GPU); replica_bytes() is the planner's figure."""
    gpu = cluster_gpu_bytes(ray)
    if gpu is None:
        log("--gpus-per-worker auto: the cluster has no GPUs; workers run on CPU")
        return 0.0
    need = replica_bytes()
    replicas = replicas_per_gpu(gpu, need)
    log(f"--gpus-per-worker auto: {replicas} replicas of {need / 2**30:.2f} GiB fit a {gpu / 2**30:.1f} GiB GPU "
        f"(lowmem-e5 plan's bytes): {1 / replicas:.3f} GPU per worker")
    return 1.0 / replicas


def start_ray(address: str | None, local_cpus: int | None, log):
    """Join the cluster at address, or start a local one (no dashboard) with local_cpus CPUs (default: all)."""
    ray = import_ray()
    t0 = time.perf_counter()
    if ray.is_initialized():  # the caller's session (a notebook, a test): use it, leave it running
        log("using the Ray session already started in this process")
        return ray, 0.0, False
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=local_cpus, include_dashboard=False, logging_level="WARNING")
    log(f"ray {ray.__version__}: {'connected to ' + address if address else 'started a local cluster'} with "
        f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs "
        f"({time.perf_counter() - t0:.1f} s)")
    return ray, time.perf_counter() - t0, True


class _Committer(threading.Thread):
    def __init__(self, manifest: Manifest, shards: list[Shard], log, every_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="lowmem-e5-committer")
        self.manifest, self.waiting, self.every_s, self.log = manifest, list(shards), every_s, log
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def sweep(self) -> None:
        for shard in list(self.waiting):
            if self.manifest.try_commit(shard):
                self.waiting.remove(shard)
                done = len(self.manifest.finished())
                self.log(f"shard {shard.name} done ({shard.rows} rows; {done}/{len(self.manifest.shards)} shards)")

    def run(self) -> None:
        try:
            while not self.stop.wait(self.every_s) and self.waiting:
                self.sweep()
        except BaseException as exc:  # reported by the driver after the pipeline
            self.error = exc


def run_corpus_on_ray(corpus: Corpus, manifest: Manifest, config, settings: EmbedSettings, *, workers: int,
                      address: str | None = None, gpus_per_worker: float | str = 0.0, replica_bytes=None,
                      cpus_per_worker: float | None = None, batch_size: int = 64, local_cpus: int | None = None,
                      progress: bool = True, log=print) -> CorpusSummary:
    """Embed the manifest's pending shards on Ray Data; returns the summary. Ray is shut down after, unless the
    caller had started it."""
    if workers < 1:
        raise ValueError(f"workers={workers} is not valid; expected an integer >= 1")
    pending = manifest.pending()
    summary = CorpusSummary(output=str(manifest.output), rows=corpus.rows, shards=len(corpus.shards),
                            shards_skipped=len(corpus.shards) - len(pending))
    if not pending:
        manifest.finish()
        return summary
    ray, start_s, owned = start_ray(address, local_cpus, log)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        if gpus_per_worker == "auto":
            gpus_per_worker = gpus_per_worker_auto(ray, replica_bytes, log)
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = max(1, int(cpus // workers if cpus_per_worker is None else cpus_per_worker))
        if cpus_per_worker is None:  # leave one CPU to Ray Data's read and write tasks
            cpus_per_worker = max(0.25, (cpus - 1) / workers) if cpus > 1 else 0.5 / workers
        t0 = time.perf_counter()
        events = ray.remote(num_cpus=0)(RunEvents).remote()
        shards = ray.data.from_items(
            [{"path": str(s.path), "name": s.name, "sha256": s.sha256, "rows": s.rows, "first_row": s.first_row}
             for s in pending], override_num_blocks=len(pending))
        rows = shards.map_batches(read_shard_rows, batch_size=1, num_cpus=0,
                                  fn_kwargs={"text_field": corpus.text_field, "id_field": corpus.id_field})
        vectors = rows.map_batches(
            EmbedWorker, batch_size=batch_size, batch_format="numpy",
            fn_constructor_kwargs={"config": config.to_dict(), "settings": asdict(settings), "events": events,
                                   "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
            **({"num_gpus": gpus_per_worker} if gpus_per_worker else {}))
        committer = _Committer(manifest, pending, log)
        committer.start()
        try:
            vectors.write_parquet(str(manifest.staging), partition_cols=[PARTITION])
        finally:
            committer.stop.set()
            committer.join()
        if committer.error is not None:
            raise committer.error
        committer.sweep()
        if committer.waiting:
            raise RuntimeError(f"Ray Data finished but shards {[s.name for s in committer.waiting]} are incomplete")
        manifest.finish()
        summary.seconds = time.perf_counter() - t0
        report = ray.get(events.report.remote())
        summary.real_tokens, summary.padded_tokens, summary.batches, summary.truncated = report["tokens"]
        summary.retries = report["restarts"]
        summary.extra = {"workers": workers, "gpus_per_worker": gpus_per_worker, "cpus_per_worker": cpus_per_worker,
                         "threads_per_worker": threads, "ray_start_s": round(start_s, 3),
                         "model_load_s": [round(x, 3) for x in report["loads"]]}
        return summary
    finally:
        if owned:
            ray.shutdown()
