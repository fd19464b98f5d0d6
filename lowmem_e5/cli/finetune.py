"""`lowmem-e5 finetune`: a LoRA trained contrastively on (query, document) pairs (the E5 recipe), on a full-precision
or quantised base; with --eval-beir, held-out retrieval before and after goes into its record."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..errors import LowmemError
from .shared import add_runtime_args, log, runtime_config


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..jobs.atomic import write_json_atomic
    from ..quality.beir import load_beir
    from ..quality.finetune import RECORD_FILE, FinetuneConfig, pairs_from_beir, read_pairs, train_adapter
    from ..quality.retrieval import RETRIEVAL_MAX_LENGTH, retrieval_run

    if bool(args.pairs) == bool(args.beir):
        raise LowmemError("give --pairs FILE.jsonl or --beir DIR (its --train-split), one of them")
    from ..quality.beir import suggested_instruction

    if not (args.task or args.instruction) and args.pairs:
        raise LowmemError("queries need --task NAME or --instruction TEXT, as `encode` will be given them")
    config = runtime_config(args)

    def folder_instruction(folder: Path) -> str | None:
        """The run's --instruction / --task, else what the labelled set records for the folder."""
        if args.task or args.instruction:
            return args.instruction  # None with --task: resolved from the task by train_adapter
        found = suggested_instruction(folder)
        if found is None:
            raise LowmemError(f"no query instruction for {str(folder)!r}: give --task NAME or --instruction TEXT")
        return found

    if args.pairs:
        pairs = read_pairs(args.pairs)
    else:
        pairs = [p for folder in args.beir
                 for p in pairs_from_beir(load_beir(folder, args.train_split), folder_instruction(folder))]
    fc = FinetuneConfig(rank=args.rank, alpha=args.alpha or 2 * args.rank, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
                        max_length=args.train_max_length, checkpoint_every=args.checkpoint_every, seed=args.seed)
    log(f"training a rank-{fc.rank} LoRA on {len(pairs)} pairs ({config.quant} base), {fc.epochs} epoch(s), "
        f"batches of {fc.batch_size} pairs of one task")
    record = train_adapter(config, pairs, fc, args.output, task=args.task, instruction=args.instruction,
                           progress=not args.quiet, restart=args.restart,
                           gradient_checkpointing=not args.no_gradient_checkpointing)
    record["command"] = shlex.join(["lowmem-e5", *sys.argv[1:]])  # what made it, beside its figures
    write_json_atomic(args.output / RECORD_FILE, record)
    if args.eval_beir:
        eval_config = config.replace(max_length=RETRIEVAL_MAX_LENGTH)
        record["heldout"] = []
        for folder in args.eval_beir:
            split = load_beir(folder, args.eval_split)
            runs = {}
            for name, adapter in (("before", None), ("after", args.output)):
                run = retrieval_run(eval_config, split, task=args.task, instruction=folder_instruction(folder),
                                    adapter=adapter, progress=not args.quiet)
                runs[name] = {m: run.record["quality"][m] for m in ("nDCG@10", "Recall@100", "MRR@10")}
            record["heldout"].append({**split.describe(), **runs})
            write_json_atomic(args.output / RECORD_FILE, record)
    print(json.dumps({"adapter": str(args.output), "steps": record["steps"], "first_loss": record["first_loss"],
                      "last_epoch_loss": record["last_epoch_loss"], "chance_loss": record["chance_loss"],
                      **({"heldout": {h["beir"]: {k: h[k] for k in ("before", "after")} for h in record["heldout"]}}
                         if "heldout" in record else {})}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="train a LoRA on (query, document) pairs with in-batch negatives (InfoNCE)")
    ft.add_argument("--pairs", type=Path, help='.jsonl of {"query", "document", optional "negative"} objects')
    ft.add_argument("--beir", type=Path, action="append", help="a BEIR folder: pairs from the relevant judgements of "
                    "--train-split (repeat for several; each keeps its own instruction)")
    ft.add_argument("--train-split", default="train")
    ft.add_argument("--task", help="an official task name for the query instruction (`lowmem-e5 tasks`)")
    ft.add_argument("--instruction", help="a free-text query instruction")
    ft.add_argument("--output", required=True, type=Path, help="the adapter folder to write (must not exist)")
    ft.add_argument("--rank", type=int, default=8)
    ft.add_argument("--alpha", type=int, help="LoRA alpha (default: 2 x rank)")
    ft.add_argument("--epochs", type=int, default=1)
    ft.add_argument("--batch-size", type=int, default=32, help="pairs per step (in-batch negatives)")
    ft.add_argument("--lr", type=float, default=2e-3)
    ft.add_argument("--temperature", type=float, default=0.02)
    ft.add_argument("--train-max-length", type=int, default=256, help="tokens per training text")
    ft.add_argument("--checkpoint-every", type=int, default=8, help="steps between checkpoints (resume)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--restart", action="store_true", help="drop a checkpoint of other settings and start over")
    ft.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="keep every activation for the backward pass: faster, several times the memory")
    ft.add_argument("--eval-beir", type=Path, action="append", help="a BEIR folder to score before and after on "
                    "--eval-split (repeat for several)")
    ft.add_argument("--eval-split", default="test")
    ft.add_argument("--quiet", action="store_true")
    add_runtime_args(ft)
    ft.set_defaults(func=cmd_finetune)
