"""The quality commands: `reference`, `drift`, `scan`, `compare`, `repair`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LowmemError
from ..runtime.config import RuntimeConfig
from .retrieval import add_vector_args
from .shared import add_runtime_args, log, runtime_config


def _calibration_rows(args: argparse.Namespace):
    from ..runtime.calibration_set import load_calibration_set

    return load_calibration_set(args.set).select(args.split, max_chars=args.max_chars)


def _reference_and_set(args: argparse.Namespace, config: RuntimeConfig):
    """The reference (--reference or the model's default path) and the whole calibration set, checked to match."""
    from ..quality.evaluation import default_reference_path
    from ..quality.reference import read_reference
    from ..runtime.calibration_set import load_calibration_set

    reference = read_reference(args.reference or default_reference_path(config.model))
    cset = load_calibration_set(args.set)
    reference.check_set(cset)
    return reference, cset


def _reference_and_rows(args: argparse.Namespace, config: RuntimeConfig):
    """The reference and the rows picked by --split and --max-chars."""
    reference, cset = _reference_and_set(args, config)
    return reference, cset.select(args.split, max_chars=args.max_chars)


def cmd_reference(args: argparse.Namespace) -> int:
    from ..quality.evaluation import CALIBRATION_MAX_LENGTH, default_reference_path, make_reference, reference_mode
    from ..runtime.calibration_set import load_calibration_set

    config = runtime_config(args)
    if args.quant is None:
        config = config.replace(quant=reference_mode(config.resolved_device()))
    if args.max_length is None:
        config = config.replace(max_length=CALIBRATION_MAX_LENGTH)
    output = args.output or default_reference_path(config.model)
    ref, seconds = make_reference(config, load_calibration_set(args.set), output)
    print(json.dumps({"reference": str(output), "rows": len(ref.ids), "mode": ref.mode,
                      "max_length": ref.max_length, "set_version": ref.set_version, "seconds": round(seconds, 2),
                      "fingerprint": ref.fingerprint}))
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from ..jobs.atomic import write_json_atomic
    from ..quality.evaluation import drift_run
    from ..quality.thresholds import gate_failures

    config = runtime_config(args)
    reference, cset = _reference_and_rows(args, config)
    run = drift_run(config, reference, cset)
    failures = gate_failures(run.report, config.quant)
    run.record["quality"]["gate_failures"] = failures
    if args.output:
        write_json_atomic(args.output, run.record)
    print(json.dumps(run.record["quality"]))
    if failures:
        log(f"drift past the {config.quant} gate: {'; '.join(failures)}")
        return 1 if args.check else 0
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from ..jobs.atomic import write_json_atomic
    from ..quality.precision_plans import greedy_plans, linear_sensitivity
    from ..runtime.encoder import Embedder
    from ..runtime.loading import load_model
    from ..runtime.tokenization import pad_rows

    config = runtime_config(args).replace(quant="fp32", double_quant=False, overrides=())
    cset = _calibration_rows(args)
    embedder = Embedder(load_model(config))
    tok = embedder.tokenize([r.text for r in cset.rows])
    batches = []
    for start in range(0, len(tok.rows), 8):
        ids, mask, pos = pad_rows(tok.rows[start:start + 8], embedder.special.pad, "right")
        batches.append({"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    sens = linear_sensitivity(embedder.loaded.model, batches, quant_type=args.quant_type)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    plans = greedy_plans(sens, fractions)
    by_layer: dict[str, list[float]] = {}
    by_proj: dict[str, list[float]] = {}
    for s in sens:  # names look like layers.12.self_attn.v_proj
        parts = s.name.split(".")
        by_layer.setdefault(parts[1], []).append(s.relative_error)
        by_proj.setdefault(parts[-1], []).append(s.relative_error)
    result = {
        "model": embedder.loaded.source, "quant_type": args.quant_type, "split": args.split, "texts": len(cset.rows),
        "modules": [{"name": s.name, "relative_error": s.relative_error, "weights": s.weights} for s in sens],
        "mean_error_by_layer": {k: sum(v) / len(v) for k, v in by_layer.items()},
        "mean_error_by_projection": {k: sum(v) / len(v) for k, v in by_proj.items()},
        "plans": [{"fraction": f, "overrides": list(p)} for f, p in zip(fractions, plans)],
    }
    write_json_atomic(args.output, result)
    top = ", ".join(f"{s.name} {s.relative_error:.3f}" for s in sens[:5])
    log(f"most sensitive: {top}")
    print(json.dumps({"output": str(args.output), "modules": len(sens),
                      "plans": {f: len(p) for f, p in zip(fractions, plans)}}))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..jobs.atomic import write_bytes_atomic
    from ..quality.compare import (
        BASE_GRID,
        RetrievalSpec,
        default_grid,
        markdown_table,
        plan_entries,
        index_memory_table,
        plot,
        plot_index_memory,
        plot_retention,
        run_grid,
    )

    config = runtime_config(args)
    reference, cset = _reference_and_rows(args, config)
    retrieval = None
    if args.vectors and not args.beir:
        raise LowmemError("--vectors measures vector formats by retrieval: add --beir FOLDER")
    if args.beir:
        from ..quality.beir import load_beir
        from ..quality.retrieval import DocumentCache
        from .retrieval import parse_vector_rows, query_instruction

        rows = parse_vector_rows(args)
        query_instruction(args)
        retrieval = RetrievalSpec(load_beir(args.beir, args.beir_split), task=args.task, instruction=args.instruction,
                                  cache=DocumentCache(args.cache_dir), vectors=tuple(rows))
    if args.modes:
        wanted = args.modes.split(",")
        unknown = [m for m in wanted if m not in {e.label for e in BASE_GRID}]
        if unknown:
            raise LowmemError(f"--modes has unknown {unknown}; expected some of: {', '.join(e.label for e in BASE_GRID)}")
        entries = [e for e in BASE_GRID if e.label in wanted]
    else:
        entries = default_grid(config.resolved_device())
    if args.scan:
        if not args.scan.is_file():
            raise LowmemError(f"scan result {str(args.scan)!r} does not exist; make it with `lowmem-e5 scan`")
        entries += plan_entries(json.loads(args.scan.read_text()))
    records, retrieval_records = run_grid(entries, config, reference, cset, args.out_dir, force=args.force, log=log,
                                          retrieval=retrieval)
    table = markdown_table(records, retrieval_records)
    write_bytes_atomic(args.out_dir / "table.md", (table + "\n").encode())
    plot(records, args.out_dir / "memory_vs_drift.png",
         f"{Path(reference.source).name}: memory against drift ({cset.version}, {args.split}, "
         f"{len(cset.rows)} texts)")
    if retrieval is not None:
        where = (f"({retrieval.split.root.name}, {retrieval.split.split}, {len(retrieval.split.query_ids)} queries, "
                 f"{len(retrieval.split.doc_ids)} documents)")
        plot_retention(retrieval_records, args.out_dir / "memory_vs_retrieval.png",
                       f"{Path(reference.source).name}: memory against nDCG@10 retention {where}")
        if args.vectors:
            index_table = index_memory_table(retrieval_records)
            write_bytes_atomic(args.out_dir / "index_memory.md", (index_table + "\n").encode())
            plot_index_memory(retrieval_records, args.out_dir / "index_memory.png",
                              f"{Path(reference.source).name}: weights x vector formats {where}")
            table += "\n\n" + index_table
    print(table)
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from ..jobs.atomic import write_json_atomic
    from ..quality.repair import RepairConfig, repaired_drift, train_repair_adapter
    from ..results import mode_label

    config = runtime_config(args)
    if config.quant not in ("int8", "nf4", "fp4", "gptq4"):
        raise LowmemError(f"--quant {config.quant} needs no repair; expected a quantised mode: int8, nf4, fp4, gptq4")
    reference, cset = _reference_and_set(args, config)
    tune = cset.select("tune", max_chars=args.max_chars)
    heldout = cset.select("heldout", max_chars=args.max_chars)
    output = args.output or Path("calibration/adapters") / f"repair-{mode_label(config.quant, config.double_quant)}"
    output.parent.mkdir(parents=True, exist_ok=True)
    rc = RepairConfig(rank=args.rank, alpha=2 * args.rank, epochs=args.epochs, lr=args.lr, loss=args.loss)
    log(f"training a rank-{rc.rank} LoRA on {len(tune.rows)} tuning texts against the {reference.mode} reference")
    train = train_repair_adapter(config, reference, tune, rc, output, progress=not args.quiet)
    drift = repaired_drift(config, reference, heldout, output)
    result = {"adapter": str(output), "adapter_bytes": train["adapter_bytes"], "train": train, "heldout": drift}
    write_json_atomic(output / "repair.json", result)
    print(json.dumps({"adapter": str(output), "adapter_bytes": train["adapter_bytes"],
                      "heldout_mean_drift_before": drift["before"]["mean_drift"],
                      "heldout_mean_drift_after": drift["after"]["mean_drift"],
                      "drift_reduction": drift["drift_reduction"]}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    ref = sub.add_parser("reference", help="full-precision embeddings of the calibration set, with the model fingerprint")
    ref.add_argument("--set", type=Path, default=None, help="calibration set .jsonl (default: calibration/set_v1.jsonl)")
    ref.add_argument("--output", type=Path, help="default: calibration/references/<model>.safetensors")
    add_runtime_args(ref)
    ref.set_defaults(func=cmd_reference)

    dr = sub.add_parser("drift", help="cosine drift of one mode against the reference, and retrieval agreement")
    dr.add_argument("--set", type=Path, default=None)
    dr.add_argument("--reference", type=Path, help="default: calibration/references/<model>.safetensors")
    dr.add_argument("--split", default="heldout", choices=("tune", "heldout", "all"))
    dr.add_argument("--max-chars", type=int, help="only calibration texts up to this many characters")
    dr.add_argument("--output", type=Path, help="write the result record (run/quality/memory/speed/environment)")
    dr.add_argument("--check", action="store_true", help="exit 1 when the mode's drift gate fails")
    add_runtime_args(dr)
    dr.set_defaults(func=cmd_drift)

    sc = sub.add_parser("scan", help="per-module 4-bit sensitivity on the calibration tuning split, and mixed plans")
    sc.add_argument("--set", type=Path, default=None)
    sc.add_argument("--split", default="tune", choices=("tune", "heldout", "all"))
    sc.add_argument("--max-chars", type=int, default=600)
    sc.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    sc.add_argument("--fractions", default="0.1,0.25,0.5,0.9", help="shares of Linear weights to keep in int8")
    sc.add_argument("--output", type=Path, default=Path("calibration/results/sensitivity.json"))
    add_runtime_args(sc)
    sc.set_defaults(func=cmd_scan)

    cp = sub.add_parser("compare", help="drift and memory of every mode (and mixed plans): JSON per run, table, plot")
    cp.add_argument("--set", type=Path, default=None)
    cp.add_argument("--reference", type=Path)
    cp.add_argument("--split", default="heldout", choices=("tune", "heldout", "all"))
    cp.add_argument("--max-chars", type=int)
    cp.add_argument("--modes", help="comma-separated subset of: fp32,fp16,bf16,int8,nf4,nf4+dq,fp4,fp4+dq,"
                    "gptq4-g128,gptq4-g64 (gptq4: extra [gptq])")
    cp.add_argument("--scan", type=Path, help="a `lowmem-e5 scan` result: adds its mixed plans to the grid")
    cp.add_argument("--out-dir", type=Path, default=Path("calibration/results/compare"))
    cp.add_argument("--force", action="store_true", help="recompute runs whose result file exists")
    cp.add_argument("--beir", type=Path, help="a BEIR folder: adds nDCG@10 / Recall@100 / MRR@10 and their retention "
                    "against the reference mode, and memory_vs_retrieval.png")
    cp.add_argument("--beir-split", default="test")
    cp.add_argument("--task", help="query instruction of the BEIR queries by task name")
    cp.add_argument("--instruction", help="query instruction of the BEIR queries as free text")
    cp.add_argument("--cache-dir", type=Path, help="document embeddings cache (see `retrieval`)")
    add_vector_args(cp)
    add_runtime_args(cp)
    cp.set_defaults(func=cmd_compare)

    rp = sub.add_parser("repair", help="train a LoRA that pulls the quantised model back to the reference")
    rp.add_argument("--set", type=Path, default=None)
    rp.add_argument("--reference", type=Path)
    rp.add_argument("--max-chars", type=int, default=600, help="calibration texts used (train: tune, report: heldout)")
    rp.add_argument("--rank", type=int, default=8)
    rp.add_argument("--epochs", type=int, default=6)
    rp.add_argument("--lr", type=float, default=1e-3)
    rp.add_argument("--loss", default="cosine", choices=("cosine", "mse"))
    rp.add_argument("--output", type=Path, help="adapter folder (default: calibration/adapters/repair-<mode>)")
    rp.add_argument("--quiet", action="store_true")
    add_runtime_args(rp)
    rp.set_defaults(func=cmd_repair)
