"""`lowmem-e5 retrieval`: nDCG@10, Recall@100 and MRR@10 of one mode on a BEIR split, with retention against the
reference mode (fp32 on CPU, fp16 on GPU) and its 95 % paired bootstrap interval."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LowmemError
from .shared import add_runtime_args, log, runtime_config


def cmd_retrieval(args: argparse.Namespace) -> int:
    from ..jobs.atomic import write_json_atomic
    from ..quality.evaluation import reference_mode
    from ..quality.retrieval import (
        FLOAT32,
        RETRIEVAL_MAX_LENGTH,
        DocumentCache,
        add_retention,
        add_vector_retention,
        retrieval_run,
        retrieval_runs,
    )

    rows = parse_vector_rows(args)
    query_instruction(args)
    config = runtime_config(args)
    if args.max_length is None:
        config = config.replace(max_length=RETRIEVAL_MAX_LENGTH)
    from ..quality.beir import load_beir

    split = load_beir(args.beir, args.split)
    cache = DocumentCache(args.cache_dir)
    log(f"{split.root.name}/{split.split}: {len(split.query_ids)} queries against {len(split.doc_ids)} documents")
    kwargs = dict(task=args.task, instruction=args.instruction, adapter=args.adapter, cache=cache,
                  progress=not args.quiet)
    runs = retrieval_runs(config, split, vectors=rows, **kwargs)
    records = [runs[row.label].record for row in rows]
    ref_quant = reference_mode(config.resolved_device())
    if not args.no_retention:
        if config.quant != ref_quant:
            log(f"reference run in {ref_quant} (float32 vectors) for retention")
            ref_config = config.replace(quant=ref_quant, double_quant=False, overrides=(), compute_dtype=None)
            reference = retrieval_run(ref_config, split, **kwargs).record
        else:
            reference = runs[FLOAT32.label].record
        for record in records:
            if record is not reference:
                add_retention(record, reference)
        add_vector_retention(records)
    if not args.vectors:
        records = records[:1]
    if args.output:
        write_json_atomic(args.output, records[0] if len(records) == 1 else records)
    for record in records:
        q = record["quality"]
        summary = {"mode": record["run"]["mode"], "vectors": record["run"]["vectors"],
                   "index_bytes_per_document": record["memory"]["index_bytes_per_document"],
                   **{m: q[m] for m in ("nDCG@10", "Recall@100", "MRR@10")}}
        for key in ("retention", "retention_vs_float32_vectors"):
            if key in q:
                summary[key] = {m: q[key][m] for m in ("nDCG@10", "Recall@100", "MRR@10")}
        print(json.dumps(summary))
    return 0


def parse_rescore(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [-1]
    if not values or any(v < 0 for v in values):
        raise LowmemError(f"--rescore {text!r} is not valid; expected a factor such as 4 (the Hamming-nearest k x 4 "
                          "rescored with the float query), 0 for none, or a list such as 0,4")
    return values


def parse_vector_rows(args: argparse.Namespace) -> list:
    """--vectors and --rescore as the vector rows of a retrieval run (float32 first)."""
    from ..quality.retrieval import vector_rows
    from ..runtime.vector_formats import parse_formats

    formats = parse_formats(args.vectors or "float32")
    rescores = parse_rescore(args.rescore)
    if rescores != [0] and not any(f.is_binary for f in formats):
        raise LowmemError(f"--rescore {args.rescore} applies to binary and ubinary vectors; --vectors "
                          f"{args.vectors or 'float32'} has none")
    return vector_rows(formats, rescores)


def query_instruction(args: argparse.Namespace) -> None:
    """--task or --instruction, or the instruction this project's labelled set records for the folder."""
    from ..quality.beir import suggested_instruction

    if not (args.task or args.instruction):
        args.instruction = suggested_instruction(args.beir) if args.beir else None
        if args.instruction is None:
            raise LowmemError("queries need --task NAME or --instruction TEXT (see `lowmem-e5 tasks`)")
        log(f"query instruction from the labelled set's manifest: {args.instruction!r}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    rt = sub.add_parser("retrieval", help="nDCG@10 / Recall@100 / MRR@10 on a BEIR folder, with retention vs fp32/fp16")
    rt.add_argument("--beir", required=True, type=Path, help="folder with corpus.jsonl, queries.jsonl, qrels/")
    rt.add_argument("--split", default="test", help="qrels/<split>.tsv (default: test)")
    rt.add_argument("--task", help="an official task name for the query instruction (`lowmem-e5 tasks`)")
    rt.add_argument("--instruction", help="a free-text query instruction")
    rt.add_argument("--adapter", type=Path, help="a peft LoRA folder applied to queries and documents")
    rt.add_argument("--output", type=Path, help="write the result record (run/quality/memory/speed/environment)")
    rt.add_argument("--no-retention", action="store_true", help="skip the reference mode's run")
    rt.add_argument("--quiet", action="store_true", help="no progress bars")
    rt.add_argument("--cache-dir", type=Path, help="document embeddings cache (default: ~/.cache/lowmem_e5/"
                    "document_embeddings, or $LOWMEM_E5_CACHE/document_embeddings)")
    add_vector_args(rt)
    add_runtime_args(rt)
    rt.set_defaults(func=cmd_retrieval)


def add_vector_args(parser: argparse.ArgumentParser) -> None:
    from ..runtime.vector_formats import FORMATS

    parser.add_argument("--vectors", help=f"documents stored as these vector formats, a row each: {', '.join(FORMATS)}"
                        ", binary:centred, ubinary:centred (comma-separated; float32 is always measured, as the "
                        "retention's reference)")
    parser.add_argument("--rescore", default="0", help="binary formats: rescore the k x N Hamming-nearest documents "
                        "with the float query (0: Hamming distance only; a list such as 0,4 gives a row each)")
