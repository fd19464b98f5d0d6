"""What every model command shares: the runtime flags (and `--config`) that make a RuntimeConfig, and the
message helper."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import LowmemError
from ..runtime.config import COMPUTE_DTYPES, DEFAULT_MODEL, PADDING_SIDES, QUANT_MODES, RuntimeConfig


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    d = RuntimeConfig()
    g = p.add_argument_group("model and runtime")
    g.add_argument("--config", type=Path, help="JSON file with RuntimeConfig fields; flags below override it")
    g.add_argument("--model", help=f"hub id or local folder (default: {DEFAULT_MODEL!r}, the cached small real model)")
    g.add_argument("--quant", choices=QUANT_MODES, help=f"weight format (default: {d.quant})")
    g.add_argument("--double-quant", action="store_true", default=None, help="also quantise 4-bit block constants")
    g.add_argument("--group-size", type=int, help=f"gptq4: input columns per group of scales (default: {d.group_size})")
    g.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, help="default: float32 on CPU, float16 on GPU")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--max-length", type=int, help=f"tokens per text with BOS and EOS (default: {d.max_length})")
    g.add_argument("--token-budget", type=int, help=f"padded tokens per batch (default: {d.token_budget})")
    g.add_argument("--no-truncate", dest="truncate", action="store_false", default=None,
                   help="refuse texts longer than max length instead of truncating them")
    g.add_argument("--padding-side", choices=PADDING_SIDES)
    g.add_argument("--int8-threshold", type=float,
                   help="LLM.int8() outlier threshold (default 6.0); 0: no outlier columns, batch-invariant vectors")
    g.add_argument("--no-prefix-cache", dest="cache_query_prefix", action="store_false", default=None,
                   help="run every query's instruction again instead of reusing its cached keys/values")


def runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    base = RuntimeConfig()
    if args.config is not None:
        if not args.config.is_file():
            raise LowmemError(f"config file {str(args.config)!r} does not exist")
        try:
            base = RuntimeConfig.from_json(args.config.read_text())
        except json.JSONDecodeError as exc:
            raise LowmemError(f"config file {str(args.config)!r} is not valid JSON: {exc}") from None
    overrides = {k: getattr(args, k) for k in ("model", "quant", "double_quant", "compute_dtype", "device",
                                                "max_length", "token_budget", "truncate", "padding_side",
                                                "cache_query_prefix", "int8_threshold", "group_size")}
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})


def log(msg: str) -> None:
    print(f"lowmem-e5: {msg}", file=sys.stderr)
