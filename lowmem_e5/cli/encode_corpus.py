"""`encode` into a folder: a corpus with ids into Parquet shards, on this machine or on Ray (`--ray`)."""

from __future__ import annotations

import argparse
import json
import time

from ..errors import LowmemError
from .shared import log, runtime_config
from .vectors import check_ranges, vector_settings


def parse_gpus_per_worker(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 64:
        raise LowmemError(f"--gpus-per-worker {text!r} is not valid; expected 'auto' or a number of GPUs such as 0.25, "
                          "0.5 or 1 (0: CPU workers)")
    return value


def replica_bytes_for(config, source: str):
    """What `lowmem-e5 plan` says one replica of this model needs on a GPU at the config's token budget."""
    def compute() -> int:
        from transformers import AutoConfig

        from ..quality.planner import meta_model, plan_weights, replica_bytes

        model_config = AutoConfig.from_pretrained(source)
        dtype = config.compute_dtype or "float16"
        weights = plan_weights(meta_model(model_config), config.quant, config.double_quant, dtype,
                               group_size=config.group_size)
        return replica_bytes(weights, model_config, dtype, config.token_budget)

    return compute


def cmd_encode_corpus(args: argparse.Namespace) -> int:
    from ..jobs.corpus import open_corpus
    from ..jobs.corpus_job import EmbedSettings, job_identity, run_corpus_local
    from ..jobs.manifest import Manifest
    from ..runtime.encoder import resolve_instruction
    from ..runtime.fingerprint import model_fingerprint
    from ..runtime.sources import resolve_model_source

    config = runtime_config(args)
    query = bool(args.query or args.task or args.instruction)
    if query:
        resolve_instruction(args.task, args.instruction)  # unknown task: fail before reading anything
    if args.workers < 1:
        raise LowmemError(f"--workers {args.workers} is not valid; expected an integer >= 1")
    if args.batch_size < 1:
        raise LowmemError(f"--batch-size {args.batch_size} is not valid; expected an integer >= 1")
    gpus = parse_gpus_per_worker(args.gpus_per_worker)
    if not args.ray and (args.address or args.workers != 1 or args.local_cpus):
        raise LowmemError("--address, --workers and --local-cpus run on Ray: add --ray")
    if args.ray:
        from ..jobs.distributed import import_ray

        import_ray()  # the extra is missing: say so before reading the corpus
    corpus = open_corpus(args.input, args.field, args.id_field)
    log(f"{args.input}: {corpus.rows:,} rows in {len(corpus.shards)} shard(s), ids from "
        f"{repr(corpus.id_field) if corpus.id_field else 'row positions'}")
    source, _ = resolve_model_source(config.model)
    adapter = args.adapter.resolve() if args.adapter else None
    fmt, calibration = vector_settings(args)
    try:
        model_fingerprint(source)
    except (OSError, ValueError):  # a hub model not on this (driver) machine: its workers fetch it, unchecked here
        pass
    else:
        check_ranges(args, calibration, source, config, adapter)
    settings = EmbedSettings(query=query, task=args.task, instruction=args.instruction,
                             adapter=str(adapter) if adapter else None, vectors=str(fmt),
                             calibration=calibration.to_dict() if calibration is not None else None)
    manifest = Manifest(args.output, job_identity(config, source, corpus, settings), corpus, restart=args.restart,
                        log=log, vectors=settings.vectors_entry())
    pending = manifest.pending()
    log(f"{len(pending)} of {len(corpus.shards)} shard(s) to embed into {args.output}")
    if args.ray:
        from ..jobs.distributed import run_corpus_on_ray

        summary = run_corpus_on_ray(corpus, manifest, config, settings, workers=args.workers, address=args.address,
                                    gpus_per_worker=gpus, replica_bytes=replica_bytes_for(config, source),
                                    cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                                    local_cpus=args.local_cpus, progress=not args.quiet, log=log)
    elif not pending:
        summary = run_corpus_local(corpus, manifest, None, settings, progress=False)
    else:
        from ..runtime.encoder import Embedder
        from ..runtime.loading import load_model

        t0 = time.perf_counter()
        embedder = Embedder(load_model(config))
        settings.prepare(embedder)
        log(f"loaded {embedder.loaded.source} as {config.quant} ({time.perf_counter() - t0:.1f} s)")
        summary = run_corpus_local(corpus, manifest, embedder, settings, progress=not args.quiet,
                                   on_shard_done=lambda s: log(f"shard {s.name} done ({s.rows} rows)"))
    print(json.dumps({"quant": config.quant, "vectors": str(fmt), **summary.to_dict()}))
    return 0
