"""`encode` (texts in, a resumable .npy out), and the commands about this installation: `env`, `tasks`,
`build-default-model`, `build-full-size-model`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import LowmemError
from .shared import add_runtime_args, log, runtime_config
from .vectors import add_encode_vector_args, check_ranges, vector_settings


def cmd_encode(args: argparse.Namespace) -> int:
    if args.output.suffix != ".npy":
        from .encode_corpus import cmd_encode_corpus

        return cmd_encode_corpus(args)
    for flag, value in (("--ray", args.ray), ("--id-field", args.id_field)):
        if value:
            raise LowmemError(f"{flag} writes Parquet shards with ids: give --output a folder, not a .npy file")
    from ..errors import TextTooLongError
    from ..jobs.inputs import check_output_path, read_texts
    from ..jobs.resumable import JobSpec, run_job
    from ..runtime.encoder import Embedder, resolve_instruction
    from ..runtime.loading import load_model

    config = runtime_config(args)
    query = bool(args.query or args.task or args.instruction)
    if query:
        resolve_instruction(args.task, args.instruction)  # unknown task: fail before loading anything
    output = check_output_path(args.output)
    inputs = read_texts(args.input, field=args.field)
    fmt, calibration = vector_settings(args)
    log(f"loading {config.model} as {config.quant} ...")
    t0 = time.perf_counter()
    loaded = load_model(config)
    embedder = Embedder(loaded)
    if args.adapter is not None:
        info = embedder.load_adapter("cli", args.adapter)
        log(f"adapter {args.adapter}: rank {info.rank}, {info.bytes:,} bytes")
    log(f"loaded {loaded.source} as {config.quant} on {loaded.device}: "
        f"{loaded.weight_bytes.total:,} weight bytes ({time.perf_counter() - t0:.1f} s)")
    check_ranges(args, calibration, loaded.source, config, args.adapter.resolve() if args.adapter else None)
    try:  # tokenise everything first, so a too-long text is named by its line before any work
        tokenized = embedder.tokenize(inputs.texts, query=query, task=args.task, instruction=args.instruction)
    except TextTooLongError as exc:
        raise LowmemError(f"{inputs.where(exc.index)}: text has {exc.n_tokens} tokens, more than "
                          f"max_length={exc.max_length} (--no-truncate is set)") from None
    if tokenized.truncated:
        log(f"{len(tokenized.truncated)} of {len(inputs.texts)} texts exceed max_length={config.max_length} "
            f"and are truncated (first: {inputs.where(tokenized.truncated[0])})")
    spec = JobSpec(texts=inputs.texts, output=output, query=query, task=args.task, instruction=args.instruction,
                   chunk_size=args.chunk_size, adapter=str(args.adapter.resolve()) if args.adapter else None,
                   vectors=str(fmt), calibration=calibration)
    t1 = time.perf_counter()
    result = run_job(spec, embedder, restart=args.restart, progress=not args.quiet)
    elapsed = time.perf_counter() - t1
    s = result.stats
    summary = {
        "output": str(result.output), "shape": list(result.shape), "vectors": str(fmt), "quant": config.quant,
        "weight_bytes": loaded.weight_bytes.total, "truncated": s.n_truncated, "real_tokens": s.real_tokens,
        "padded_tokens": s.padded_tokens, "batches": s.n_batches, "oom_retries": s.oom_retries,
        "chunks": result.chunks_total, "chunks_resumed": result.chunks_resumed, "seconds": round(elapsed, 3),
    }
    print(json.dumps(summary))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from ..environment import report

    print(json.dumps(report(), indent=2))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from ..runtime.instructions import TASK_INSTRUCTIONS

    for name, inst in TASK_INSTRUCTIONS.items():
        print(f"{name}\t{inst}")
    return 0


def cmd_build_default_model(args: argparse.Namespace) -> int:
    from ..default_model import ensure_default_model, remove_default_model

    if args.force:
        remove_default_model()
    print(ensure_default_model())
    return 0


def cmd_build_full_size_model(args: argparse.Namespace) -> int:
    from ..quality.full_size import build_e5_shaped_folder, default_folder

    target = args.output or default_folder(args.tiny)
    if (target / "model.safetensors.index.json").is_file():
        log(f"{target} is already built")
    else:
        log(f"building {'a tiny' if args.tiny else 'the full-size'} E5-Mistral-shaped folder (random weights) in "
            f"{target}")
    t0 = time.perf_counter()
    path = build_e5_shaped_folder(target, tiny=args.tiny, seed=args.seed, post_processor=args.post_processor,
                                  tokenizer_from=args.tokenizer_from)
    print(json.dumps({"folder": str(path), "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    enc = sub.add_parser("encode", help="embed texts into a .npy, or a corpus with ids into Parquet shards (here or "
                         "on Ray)")
    enc.add_argument("--input", required=True, type=Path, help="a .txt or .jsonl file; for a folder output also a "
                     ".parquet file or a folder of .jsonl / .parquet shards")
    enc.add_argument("--output", required=True, type=Path, help="a .npy file (rows follow the input order), or a "
                     "folder of Parquet shards (id + embedding per row, one shard=<name>/ per input shard, _manifest.json)")
    enc.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text (default: text)")
    enc.add_argument("--id-field", help="field / column holding each row's id (default: 'id' if the first row has "
                     "one, else the row's position in the corpus)")
    enc.add_argument("--query", action="store_true", help="texts are queries: prepend the task instruction")
    enc.add_argument("--task", help="official task name (see `lowmem-e5 tasks`); implies --query")
    enc.add_argument("--instruction", help="free-text task instruction; implies --query")
    enc.add_argument("--adapter", type=Path, help="a LoRA adapter folder (peft, safetensors) to apply")
    enc.add_argument("--chunk-size", type=int, default=256, help="texts per saved chunk (resume granularity)")
    enc.add_argument("--restart", action="store_true", help="discard a partial run instead of resuming it")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = enc.add_argument_group("scale-out on Ray Data (extra [ray]; folder output)")
    ray.add_argument("--ray", action="store_true", help="embed on a Ray cluster (a local one unless --address)")
    ray.add_argument("--address", help="Ray cluster to join: 'auto' (the one `ray start` runs here) or HOST:PORT")
    ray.add_argument("--local-cpus", type=int,
                     help="CPUs of the local cluster started without --address (default: all)")
    ray.add_argument("--workers", type=int, default=1, help="model replicas, one Ray actor each (default 1)")
    ray.add_argument("--gpus-per-worker", default="auto", help="GPU share per worker, e.g. 0.25, or 'auto': as many "
                     "replicas per GPU as `lowmem-e5 plan` says fit at --token-budget (CPU workers without GPUs)")
    ray.add_argument("--cpus-per-worker", type=float, help="CPUs Ray reserves per worker (default: the cluster's "
                     "CPUs less one, shared among the workers)")
    ray.add_argument("--batch-size", type=int, default=64, help="texts sent to a worker at a time (default 64)")
    add_encode_vector_args(enc)
    add_runtime_args(enc)
    enc.set_defaults(func=cmd_encode)


def add_environment_commands(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("env", help="versions, devices, and whether bitsandbytes works here").set_defaults(func=cmd_env)
    sub.add_parser("tasks", help="the official E5 task instructions").set_defaults(func=cmd_tasks)
    b = sub.add_parser("build-default-model", help="build the default model into the cache: fetch and convert "
                       "SmolLM2-135M, merge its E5-recipe adapter")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=cmd_build_default_model)
    f = sub.add_parser("build-full-size-model", help="a folder shaped exactly like intfloat/e5-mistral-7b-instruct "
                       "(its config, its real tokenizer, fp16 safetensors shards) with random weights, for measuring "
                       "memory, bytes and time (extra [full-size])")
    f.add_argument("--output", type=Path, help="the folder (default: e5-mistral-7b-random-v1 in the cache)")
    f.add_argument("--tiny", action="store_true", help="2 layers, 64 wide, the real 32,000-token vocabulary")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--post-processor", choices=("bos", "bos+eos"), default="bos",
                   help="the tokenizer's post-processor: the hub's (BOS only, default) or BOS + EOS")
    f.add_argument("--tokenizer-from", type=Path, help="copy the tokenizer files of an earlier folder instead of "
                   "converting mistral-common's (where mistral-common and sentencepiece are not installed)")
    f.set_defaults(func=cmd_build_full_size_model)
