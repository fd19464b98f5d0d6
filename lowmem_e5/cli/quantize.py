"""`quantize`: quantise a model once and save it, so later loads skip the full-precision pass."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import LowmemError
from .shared import add_runtime_args, log, runtime_config


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..runtime.checkpoints import SAVABLE, save_quantized, weight_files
    from ..runtime.fingerprint import model_fingerprint
    from ..runtime.loading import load_model
    from ..runtime.sources import resolve_model_source

    config = runtime_config(args)
    if config.quant not in SAVABLE:
        raise LowmemError(f"--quant {config.quant} is not a quantised mode; expected one of: {', '.join(SAVABLE)}")
    if args.output.exists():
        raise LowmemError(f"output {str(args.output)!r} exists; expected a new folder name")
    source, _ = resolve_model_source(config.model)
    fingerprint = model_fingerprint(source)
    t0 = time.perf_counter()
    loaded = load_model(config)
    seconds = time.perf_counter() - t0
    log(f"quantised {source} to {config.quant} in {seconds:.1f} s: {loaded.weight_bytes.total:,} weight bytes")
    out = save_quantized(loaded, args.output, fingerprint)
    print(json.dumps({"output": str(out), "quant": config.quant, "double_quant": config.double_quant,
                      "group_size": config.group_size if config.quant == "gptq4" else None,
                      "weight_bytes": loaded.weight_bytes.total,
                      "disk_bytes": sum(p.stat().st_size for p in weight_files(out)),
                      "quantise_s": round(seconds, 3)}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="quantise a model once (int8, nf4, fp4, gptq4) and save it for fast loads")
    q.add_argument("--output", required=True, type=Path, help="a new folder: weights, tokenizer and "
                   "lowmem_e5_checkpoint.json; load it with --model FOLDER and the same --quant")
    add_runtime_args(q)
    q.set_defaults(func=cmd_quantize)
