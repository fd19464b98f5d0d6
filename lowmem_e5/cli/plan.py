"""`plan`: weight and activation bytes per mode for a model architecture, and what fits on which card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LowmemError
from ..runtime.config import COMPUTE_DTYPES


def parse_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|MiB|MB|M|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not valid; expected a number with a unit, like 8GiB, 12GB or 6144MiB")
    unit = (m.group(2) or "B").lower()
    factor = {"gib": 1 << 30, "g": 1 << 30, "gb": 10**9, "mib": 1 << 20, "m": 1 << 20, "mb": 10**6, "b": 1}[unit]
    return int(float(m.group(1)) * factor)


def model_config(name: str):
    from ..quality.planner import e5_mistral_config

    if name == "e5-mistral":
        return e5_mistral_config()
    from transformers import AutoConfig

    path = Path(name)
    if not path.exists():
        raise LowmemError(f"model config {name!r} does not exist; expected 'e5-mistral' or a config.json / model "
                          "folder")
    return AutoConfig.from_pretrained(path.parent if path.is_file() else path)


def print_replicas(args: argparse.Namespace, config) -> int:
    from ..quality.planner import GIB, replicas_table

    gpus = {label.strip(): parse_size(label) for label in args.replicas.split(",")}
    rows = replicas_table(config, gpus, args.token_budget, args.compute_dtype, parse_size(args.reserve))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"| mode | bytes per replica at {args.token_budget:,} tokens/batch | GiB | "
          + " | ".join(f"replicas on {g}" for g in gpus) + " |")
    print("|" + "---|" * (3 + len(gpus)))
    for r in rows:
        print(f"| {r['mode']} | {r['replica_bytes']:,} | {r['replica_bytes'] / GIB:.2f} | "
              + " | ".join(str(r["replicas"][g]) for g in gpus) + " |")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ..quality.planner import GIB, card_sizes, format_index, format_plan, index_table, plan_table

    config = model_config(args.model_config)
    if args.docs is not None and args.docs < 1:
        raise LowmemError(f"--docs {args.docs} is not valid; expected a number of documents >= 1")
    if args.replicas:
        return print_replicas(args, config)
    cards = card_sizes()
    extra = parse_size(args.vram) if args.vram else None
    rows = plan_table(config, {**cards, "vram": extra} if extra is not None else cards, args.compute_dtype,
                      parse_size(args.reserve))
    if extra is not None:
        for row in rows:
            row["vram"] = {"bytes": extra, "max_token_budget": row["max_token_budget"].pop("vram")}
    index = index_table(config, args.docs, rows) if args.docs else None
    if args.json:
        print(json.dumps({"modes": rows, "index": index} if index else rows, indent=2))
        return 0
    print(format_plan(rows, list(cards)))
    if index:
        print()
        print(format_index(index, args.docs, tuple(m for m in ("fp16", "int8", "nf4") if m in index[0]["with_weights"])))
    if extra is not None:
        print(f"\non {args.vram} ({extra / GIB:.2f} GiB):")
        for row in rows:
            budget = row["vram"]["max_token_budget"]
            print(f"  {row['mode']:8s} " + (f"fits, token budget up to {budget:,} (--token-budget)" if budget
                                             else "does not fit"))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="weight bytes per mode for a model architecture, and what fits on a card")
    pl.add_argument("--vram", help="your card's memory, e.g. 8GiB (the table always shows 6, 8, 12, 16 GiB)")
    pl.add_argument("--model-config", default="e5-mistral", help="'e5-mistral' or a config.json / model folder")
    pl.add_argument("--compute-dtype", default="float16", choices=COMPUTE_DTYPES,
                    help="dtype of unquantised weights and activations (GPU default: float16)")
    pl.add_argument("--reserve", default="768MiB", help="kept free for the CUDA context and allocator")
    pl.add_argument("--replicas", metavar="SIZES", help="instead: how many replicas (one process each, as Ray workers) "
                    "fit GPUs of these sizes, e.g. 24GiB,48GiB,80GiB")
    pl.add_argument("--token-budget", type=int, default=16384, help="with --replicas: padded tokens per batch")
    pl.add_argument("--docs", type=int, help="also the index of this many documents per stored vector format "
                    "(float32 ... binary), beside the weights")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)
