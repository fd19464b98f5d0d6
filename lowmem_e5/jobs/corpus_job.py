"""Embed a corpus with ids into Parquet shards on this machine, shard by shard, resumable through the manifest.

`EmbedSettings` is what decides the vectors besides the model (query or document, task, adapter); it goes into the
manifest's identity with the runtime config and the model fingerprint, and the Ray path uses the same one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import InputError, TextTooLongError
from ..runtime.config import RuntimeConfig
from ..runtime.encoder import Embedder, EncodeStats
from ..runtime.fingerprint import model_fingerprint
from ..runtime.vector_formats import VectorCalibration, VectorFormat, quantize, require_calibration
from .corpus import Corpus
from .manifest import Manifest
from .vector_shards import shard_dir, vector_table, write_table_atomic


@dataclass(frozen=True)
class EmbedSettings:
    query: bool = False
    task: str | None = None
    instruction: str | None = None
    adapter: str | None = None  # folder of a LoRA adapter, applied to every row
    vectors: str = "float32"  # the stored format (runtime.vector_formats), e.g. "int8" or "binary:centred"
    calibration: dict | None = None  # VectorCalibration.to_dict() where the format needs one

    def __post_init__(self) -> None:
        require_calibration(VectorFormat.parse(self.vectors), self.calibration)  # unknown format or missing ranges

    def encode(self, embedder: Embedder, texts: list[str], on_batch=None):
        return embedder.encode(texts, query=self.query, task=self.task, instruction=self.instruction,
                               adapter="job" if self.adapter else None, on_batch=on_batch)

    @cached_property
    def _calibration(self) -> VectorCalibration | None:
        return VectorCalibration.from_dict(self.calibration) if self.calibration else None

    def store(self, vectors: np.ndarray) -> np.ndarray:
        """Float vectors as the codes this job writes."""
        return quantize(vectors, VectorFormat.parse(self.vectors), self._calibration)

    def identity(self) -> dict:
        """The settings as a job's identity holds them: the calibration by its sha256."""
        d = asdict(self)
        if self.calibration is not None:
            d["calibration"] = VectorCalibration.from_dict(self.calibration).sha256
        return d

    def vectors_entry(self) -> dict:
        """What a reader of the output needs besides the codes: the format and the calibration in full."""
        fmt = VectorFormat.parse(self.vectors)
        return {"format": fmt.name, "centred": fmt.centred, "calibration": self.calibration}

    def prepare(self, embedder: Embedder) -> None:
        if self.adapter:
            embedder.load_adapter("job", self.adapter)


def config_identity(config: RuntimeConfig) -> dict:
    """The runtime settings that change vectors (batching and the prefix cache do not, beyond float rounding)."""
    d = config.to_dict()
    d.pop("model")  # the model fingerprint identifies it, however it is named
    d.pop("token_budget")
    d.pop("cache_query_prefix", None)
    return d


def job_identity(config: RuntimeConfig, model_source: str, corpus: Corpus, settings: EmbedSettings) -> dict:
    try:
        fingerprint = model_fingerprint(model_source)
        fingerprint.pop("versions", None)  # recorded by results, not a reason to redo a corpus
    except (OSError, ValueError):  # a hub model not downloaded on this (driver) machine: its id stands for it
        fingerprint = {"hub_id": model_source}
    return {"config": config_identity(config), "model_fingerprint": fingerprint, "text_field": corpus.text_field,
            "id_field": corpus.id_field, "id_type": corpus.id_type, **settings.identity()}


@dataclass
class CorpusSummary:
    output: str
    rows: int
    shards: int
    shards_skipped: int
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    truncated: int = 0
    oom_retries: int = 0
    retries: int = 0  # Ray: worker restarts (their tasks retried)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d["tokens_per_s"] = round(self.real_tokens / self.seconds, 1) if self.seconds and self.real_tokens else None
        d["seconds"] = round(self.seconds, 3)
        return {**d, **extra}


def run_corpus_local(corpus: Corpus, manifest: Manifest, embedder: Embedder, settings: EmbedSettings,
                     *, progress: bool = True, on_shard_done=None) -> CorpusSummary:
    pending = manifest.pending()
    summary = CorpusSummary(output=str(manifest.output), rows=corpus.rows, shards=len(corpus.shards),
                            shards_skipped=len(corpus.shards) - len(pending))
    stats = EncodeStats()
    t0 = time.perf_counter()
    bar = tqdm(total=corpus.rows, initial=corpus.rows - sum(s.rows for s in pending), unit="text", desc="encode",
               disable=not progress)
    try:
        for shard in pending:
            rows = corpus.read(shard)
            try:
                vectors, s = settings.encode(embedder, rows.texts, on_batch=bar.update)
            except TextTooLongError as exc:
                where = f"line {exc.index + 1}" if shard.path.suffix.lower() == ".jsonl" else f"row {exc.index}"
                raise InputError(f"{shard.path}: {where}: text has {exc.n_tokens} tokens, more than max_length="
                                 f"{exc.max_length} (--no-truncate is set)") from None
            stats.merge(s)
            write_table_atomic(shard_dir(manifest.staging, shard.name) / "part-0.parquet",
                               vector_table(rows.ids, settings.store(vectors)))
            if not manifest.try_commit(shard):
                raise RuntimeError(f"shard {shard.name}: staged vectors incomplete after writing them")
            if on_shard_done is not None:
                on_shard_done(shard)
    finally:
        bar.close()
    manifest.finish()
    summary.seconds = time.perf_counter() - t0
    summary.real_tokens, summary.padded_tokens = stats.real_tokens, stats.padded_tokens
    summary.batches, summary.truncated, summary.oom_retries = stats.n_batches, stats.n_truncated, stats.oom_retries
    return summary


def output_is_parquet(path: Path) -> bool:
    return path.suffix != ".npy"
