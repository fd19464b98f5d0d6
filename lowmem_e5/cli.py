"""Command line: `lowmem-e5 encode | env | tasks | build-default-model`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import COMPUTE_DTYPES, DEFAULT_MODEL, PADDING_SIDES, QUANT_MODES, RuntimeConfig
from .errors import LowmemError


def _runtime_args(p: argparse.ArgumentParser) -> None:
    d = RuntimeConfig()
    g = p.add_argument_group("model and runtime")
    g.add_argument("--config", type=Path, help="JSON file with RuntimeConfig fields; flags below override it")
    g.add_argument("--model", help=f"hub id or local folder (default: {DEFAULT_MODEL!r}, the cached small real model)")
    g.add_argument("--quant", choices=QUANT_MODES, help=f"weight format (default: {d.quant})")
    g.add_argument("--double-quant", action="store_true", default=None, help="also quantise 4-bit block constants")
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
                                                "cache_query_prefix", "int8_threshold")}
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})


def cmd_encode(args: argparse.Namespace) -> int:
    from .encoder import Embedder, resolve_instruction
    from .errors import TextTooLongError
    from .inputs import check_output_path, read_texts
    from .jobs import JobSpec, run_job
    from .loading import load_model

    config = runtime_config(args)
    query = bool(args.query or args.task or args.instruction)
    if query:
        resolve_instruction(args.task, args.instruction)  # unknown task: fail before loading anything
    output = check_output_path(args.output)
    inputs = read_texts(args.input, field=args.field)
    t0 = time.perf_counter()
    loaded = load_model(config)
    embedder = Embedder(loaded)
    if args.adapter is not None:
        info = embedder.load_adapter("cli", args.adapter)
        log(f"adapter {args.adapter}: rank {info.rank}, {info.bytes:,} bytes")
    log(f"loaded {loaded.source} as {config.quant} on {loaded.device}: "
        f"{loaded.weight_bytes.total:,} weight bytes ({time.perf_counter() - t0:.1f} s)")
    try:  # tokenise everything first, so a too-long text is named by its line before any work
        tokenized = embedder.tokenize(inputs.texts, query=query, task=args.task, instruction=args.instruction)
    except TextTooLongError as exc:
        raise LowmemError(f"{inputs.where(exc.index)}: text has {exc.n_tokens} tokens, more than "
                          f"max_length={exc.max_length} (--no-truncate is set)") from None
    if tokenized.truncated:
        log(f"{len(tokenized.truncated)} of {len(inputs.texts)} texts exceed max_length={config.max_length} "
            f"and are truncated (first: {inputs.where(tokenized.truncated[0])})")
    spec = JobSpec(texts=inputs.texts, output=output, query=query, task=args.task, instruction=args.instruction,
                   chunk_size=args.chunk_size, adapter=str(args.adapter.resolve()) if args.adapter else None)
    t1 = time.perf_counter()
    result = run_job(spec, embedder, restart=args.restart, progress=not args.quiet)
    elapsed = time.perf_counter() - t1
    s = result.stats
    summary = {
        "output": str(result.output), "shape": list(result.shape), "quant": config.quant,
        "weight_bytes": loaded.weight_bytes.total, "truncated": s.n_truncated, "real_tokens": s.real_tokens,
        "padded_tokens": s.padded_tokens, "batches": s.n_batches, "oom_retries": s.oom_retries,
        "chunks": result.chunks_total, "chunks_resumed": result.chunks_resumed, "seconds": round(elapsed, 3),
    }
    print(json.dumps(summary))
    return 0


def _calibration_rows(args: argparse.Namespace):
    from .calibration import load_calibration_set

    return load_calibration_set(args.set).select(args.split, max_chars=args.max_chars)


def _reference_and_set(args: argparse.Namespace, config: RuntimeConfig):
    """The reference (--reference or the model's default path) and the whole calibration set, checked to match."""
    from .calibration import load_calibration_set
    from .evaluation import default_reference_path
    from .reference import read_reference

    reference = read_reference(args.reference or default_reference_path(config.model))
    cset = load_calibration_set(args.set)
    reference.check_set(cset)
    return reference, cset


def _reference_and_rows(args: argparse.Namespace, config: RuntimeConfig):
    """The reference and the rows picked by --split and --max-chars."""
    reference, cset = _reference_and_set(args, config)
    return reference, cset.select(args.split, max_chars=args.max_chars)


def cmd_reference(args: argparse.Namespace) -> int:
    from .calibration import load_calibration_set
    from .evaluation import CALIBRATION_MAX_LENGTH, default_reference_path, make_reference, reference_mode

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
    from .atomic import write_json_atomic
    from .evaluation import drift_run
    from .thresholds import gate_failures

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


def parse_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|MiB|MB|M|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not valid; expected a number with a unit, like 8GiB, 12GB or 6144MiB")
    unit = (m.group(2) or "B").lower()
    factor = {"gib": 1 << 30, "g": 1 << 30, "gb": 10**9, "mib": 1 << 20, "m": 1 << 20, "mb": 10**6, "b": 1}[unit]
    return int(float(m.group(1)) * factor)


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import GIB, card_sizes, e5_mistral_config, format_plan, plan_table

    if args.model_config == "e5-mistral":
        config = e5_mistral_config()
    else:
        from transformers import AutoConfig

        path = Path(args.model_config)
        if not path.exists():
            raise LowmemError(f"model config {args.model_config!r} does not exist; expected 'e5-mistral' or a "
                              "config.json / model folder")
        config = AutoConfig.from_pretrained(path.parent if path.is_file() else path)
    cards = card_sizes()
    extra = parse_size(args.vram) if args.vram else None
    rows = plan_table(config, {**cards, "vram": extra} if extra is not None else cards, args.compute_dtype,
                      parse_size(args.reserve))
    if extra is not None:
        for row in rows:
            row["vram"] = {"bytes": extra, "max_token_budget": row["max_token_budget"].pop("vram")}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_plan(rows, list(cards)))
    if extra is not None:
        print(f"\non {args.vram} ({extra / GIB:.2f} GiB):")
        for row in rows:
            budget = row["vram"]["max_token_budget"]
            print(f"  {row['mode']:8s} " + (f"fits, token budget up to {budget:,} (--token-budget)" if budget
                                             else "does not fit"))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from .atomic import write_json_atomic
    from .encoder import Embedder
    from .loading import load_model
    from .precision_plans import greedy_plans, linear_sensitivity
    from .tokenization import pad_rows

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
    from .atomic import write_bytes_atomic
    from .compare import BASE_GRID, default_grid, markdown_table, plan_entries, plot, run_grid

    config = runtime_config(args)
    reference, cset = _reference_and_rows(args, config)
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
    records = run_grid(entries, config, reference, cset, args.out_dir, force=args.force, log=log)
    table = markdown_table(records)
    write_bytes_atomic(args.out_dir / "table.md", (table + "\n").encode())
    plot(records, args.out_dir / "memory_vs_drift.png",
         f"{Path(reference.source).name}: memory against drift ({cset.version}, {args.split}, "
         f"{len(cset.rows)} texts)")
    print(table)
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from .atomic import write_json_atomic
    from .repair import RepairConfig, repaired_drift, train_repair_adapter
    from .results import mode_label

    config = runtime_config(args)
    if config.quant not in ("int8", "nf4", "fp4"):
        raise LowmemError(f"--quant {config.quant} needs no repair; expected a quantised mode: int8, nf4, fp4")
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


def cmd_env(args: argparse.Namespace) -> int:
    from .environment import report

    print(json.dumps(report(), indent=2))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .instructions import TASK_INSTRUCTIONS

    for name, inst in TASK_INSTRUCTIONS.items():
        print(f"{name}\t{inst}")
    return 0


def cmd_build_default_model(args: argparse.Namespace) -> int:
    from .default_model import build_default_model, default_model_path, remove_default_model

    if args.force:
        remove_default_model()
    path = default_model_path()
    if not (path / "config.json").is_file():
        build_default_model(path)
    print(path)
    return 0


def log(msg: str) -> None:
    print(f"lowmem-e5: {msg}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowmem-e5", description="E5-Mistral embeddings in 8-bit or 4-bit.")
    sub = parser.add_subparsers(dest="command", required=True)

    enc = sub.add_parser("encode", help="embed a .txt (one text per line) or .jsonl file into a .npy")
    enc.add_argument("--input", required=True, type=Path)
    enc.add_argument("--output", required=True, type=Path, help="a .npy file; rows follow the input order")
    enc.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    enc.add_argument("--query", action="store_true", help="texts are queries: prepend the task instruction")
    enc.add_argument("--task", help="official task name (see `lowmem-e5 tasks`); implies --query")
    enc.add_argument("--instruction", help="free-text task instruction; implies --query")
    enc.add_argument("--adapter", type=Path, help="a LoRA adapter folder (peft, safetensors) to apply")
    enc.add_argument("--chunk-size", type=int, default=256, help="texts per saved chunk (resume granularity)")
    enc.add_argument("--restart", action="store_true", help="discard a partial run instead of resuming it")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    _runtime_args(enc)
    enc.set_defaults(func=cmd_encode)

    ref = sub.add_parser("reference", help="full-precision embeddings of the calibration set, with the model fingerprint")
    ref.add_argument("--set", type=Path, default=None, help="calibration set .jsonl (default: calibration/set_v1.jsonl)")
    ref.add_argument("--output", type=Path, help="default: calibration/references/<model>.safetensors")
    _runtime_args(ref)
    ref.set_defaults(func=cmd_reference)

    dr = sub.add_parser("drift", help="cosine drift of one mode against the reference, and retrieval agreement")
    dr.add_argument("--set", type=Path, default=None)
    dr.add_argument("--reference", type=Path, help="default: calibration/references/<model>.safetensors")
    dr.add_argument("--split", default="heldout", choices=("tune", "heldout", "all"))
    dr.add_argument("--max-chars", type=int, help="only calibration texts up to this many characters")
    dr.add_argument("--output", type=Path, help="write the result record (run/quality/memory/speed/environment)")
    dr.add_argument("--check", action="store_true", help="exit 1 when the mode's drift gate fails")
    _runtime_args(dr)
    dr.set_defaults(func=cmd_drift)

    pl = sub.add_parser("plan", help="weight bytes per mode for a model architecture, and what fits on a card")
    pl.add_argument("--vram", help="your card's memory, e.g. 8GiB (the table always shows 6, 8, 12, 16 GiB)")
    pl.add_argument("--model-config", default="e5-mistral", help="'e5-mistral' or a config.json / model folder")
    pl.add_argument("--compute-dtype", default="float16", choices=COMPUTE_DTYPES,
                    help="dtype of unquantised weights and activations (GPU default: float16)")
    pl.add_argument("--reserve", default="768MiB", help="kept free for the CUDA context and allocator")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    sc = sub.add_parser("scan", help="per-module 4-bit sensitivity on the calibration tuning split, and mixed plans")
    sc.add_argument("--set", type=Path, default=None)
    sc.add_argument("--split", default="tune", choices=("tune", "heldout", "all"))
    sc.add_argument("--max-chars", type=int, default=600)
    sc.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    sc.add_argument("--fractions", default="0.1,0.25,0.5,0.9", help="shares of Linear weights to keep in int8")
    sc.add_argument("--output", type=Path, default=Path("calibration/results/sensitivity.json"))
    _runtime_args(sc)
    sc.set_defaults(func=cmd_scan)

    cp = sub.add_parser("compare", help="drift and memory of every mode (and mixed plans): JSON per run, table, plot")
    cp.add_argument("--set", type=Path, default=None)
    cp.add_argument("--reference", type=Path)
    cp.add_argument("--split", default="heldout", choices=("tune", "heldout", "all"))
    cp.add_argument("--max-chars", type=int)
    cp.add_argument("--modes", help="comma-separated subset of: fp32,fp16,bf16,int8,nf4,nf4+dq,fp4,fp4+dq")
    cp.add_argument("--scan", type=Path, help="a `lowmem-e5 scan` result: adds its mixed plans to the grid")
    cp.add_argument("--out-dir", type=Path, default=Path("calibration/results/compare"))
    cp.add_argument("--force", action="store_true", help="recompute runs whose result file exists")
    _runtime_args(cp)
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
    _runtime_args(rp)
    rp.set_defaults(func=cmd_repair)

    sub.add_parser("env", help="versions, devices, and whether bitsandbytes works here").set_defaults(func=cmd_env)
    sub.add_parser("tasks", help="the official E5 task instructions").set_defaults(func=cmd_tasks)
    b = sub.add_parser("build-default-model", help="fetch and convert the small real model into the cache")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=cmd_build_default_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="lowmem-e5: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LowmemError, ValueError) as exc:
        print(f"lowmem-e5: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowmem-e5: interrupted; finished chunks are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
