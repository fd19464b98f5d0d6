"""The quality-against-memory grid: one drift run per mode or plan, a result JSON each, a table and a plot."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..jobs.atomic import write_bytes_atomic, write_json_atomic
from ..results import slug
from ..runtime.calibration_set import CalibrationSet
from ..runtime.config import RuntimeConfig
from ..runtime.encoder import Embedder
from ..runtime.fingerprint import model_identity
from ..runtime.loading import load_model
from ..runtime.sources import resolve_model_source
from .beir import BeirSplit
from .evaluation import drift_run
from .reference import Reference
from .retrieval import (
    FLOAT32,
    RETRIEVAL_MAX_LENGTH,
    DocumentCache,
    VectorRow,
    add_retention,
    add_vector_retention,
    retrieval_runs,
    vectors_of,
)


@dataclass(frozen=True)
class GridEntry:
    label: str
    quant: str
    double_quant: bool = False
    overrides: tuple[str, ...] = ()
    plan: str | None = None  # short description of a mixed plan
    group_size: int = 128  # gptq4 only


BASE_GRID = [GridEntry("fp32", "fp32"), GridEntry("fp16", "fp16"), GridEntry("bf16", "bf16"),
             GridEntry("int8", "int8"), GridEntry("nf4", "nf4"), GridEntry("nf4+dq", "nf4", True),
             GridEntry("fp4", "fp4"), GridEntry("fp4+dq", "fp4", True),
             GridEntry("gptq4-g128", "gptq4", group_size=128), GridEntry("gptq4-g64", "gptq4", group_size=64)]


def gptq_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("optimum") is not None


def default_grid(device: str) -> list[GridEntry]:
    """The reference precision of the device and everything below it: fp32 on CPU (where fp16 matmuls are
    several times slower and add nothing), fp16 on GPU; gptq4 when the extra [gptq] is installed."""
    skip = "fp16" if device == "cpu" else "fp32"
    return [e for e in BASE_GRID if e.label != skip and (e.quant != "gptq4" or gptq_available())]


def plan_entries(scan: dict) -> list[GridEntry]:
    """Mixed plans from a sensitivity scan result (lowmem-e5 scan)."""
    entries = [GridEntry("nf4:emb-nf4", "nf4", True, ("embed_tokens=nf4",), "nf4+dq, token embedding nf4"),
               GridEntry("nf4:emb-int8", "nf4", False, ("embed_tokens=int8",), "nf4, token embedding int8"),
               GridEntry("int8:emb-int8", "int8", False, ("embed_tokens=int8",), "int8, token embedding int8")]
    for plan in scan["plans"]:
        pct = round(plan["fraction"] * 100)
        entries.append(GridEntry(f"nf4:int8-{pct}%:emb-int8", "nf4", False,
                                 tuple(plan["overrides"]) + ("embed_tokens=int8",),
                                 f"nf4, the {pct}% most sensitive Linear weights in int8, token embedding int8"))
    return entries


@dataclass(frozen=True)
class RetrievalSpec:
    """compare --beir: a retrieval run beside each drift run, on one loaded model."""

    split: BeirSplit
    task: str | None = None
    instruction: str | None = None
    cache: DocumentCache | None = None
    vectors: tuple[VectorRow, ...] = (FLOAT32,)  # float32 first: the retention's reference row


def retrieval_path(out_dir: Path, label: str, vectors: str = FLOAT32.label) -> Path:
    middle = "" if vectors == FLOAT32.label else f".{slug(vectors)}"
    return out_dir / f"{slug(label)}{middle}.retrieval.json"


def _settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "model"}  # the model is identified by its fingerprint


def stale_reason(record: dict, config: RuntimeConfig, model: dict, split: BeirSplit | None = None) -> str | None:
    """Why a result file of an earlier grid run cannot stand for this one (None: it can)."""
    run = record.get("run", {})
    if "model_fingerprint" not in run:
        return "it records no model fingerprint (written by an older lowmem-e5)"
    if run["model_fingerprint"] != model:
        return "it was made from another model"
    if _settings(run.get("config", {})) != _settings(json.loads(json.dumps(config.to_dict()))):  # as JSON stores it
        return "it was made with other settings"
    if split is not None and (run.get("corpus_sha256"), run.get("split")) != (split.corpus_sha256, split.split):
        return "it was made on another corpus or split"
    return None


def _kept(path: Path, config: RuntimeConfig, model: dict, split: BeirSplit | None = None) -> tuple[dict | None, str]:
    if not path.exists():
        return None, ""
    record = json.loads(path.read_text())
    reason = stale_reason(record, config, model, split)
    return (None, f"{path.name} redone: {reason}") if reason else (record, "")


def run_grid(entries: list[GridEntry], base: RuntimeConfig, reference: Reference, cset: CalibrationSet,
             out_dir: Path, force: bool = False, log=print, retrieval: RetrievalSpec | None = None,
             ) -> tuple[list[dict], list[dict]]:
    """Drift records (and retrieval records with retention against the reference mode's, for compare --beir).
    Resumable: a run whose result files exist is read back, not recomputed, when they were made from this model
    (fingerprint), with these settings (and on this corpus); otherwise it is redone, saying why."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model_identity(resolve_model_source(base.model)[0])
    records, retrieval_records = [], []
    for i, e in enumerate(entries, start=1):
        path = out_dir / f"{slug(e.label)}.json"
        config = base.replace(quant=e.quant, double_quant=e.double_quant, overrides=e.overrides,
                              group_size=e.group_size)
        if not force:
            kept, why = _kept(path, config.replace(max_length=reference.max_length), model)
            r_kept: list[dict] = []
            if kept is not None and retrieval is not None:
                for row in retrieval.vectors:
                    one, why = _kept(retrieval_path(out_dir, e.label, row.label),
                                     config.replace(max_length=RETRIEVAL_MAX_LENGTH), model, retrieval.split)
                    if one is None:
                        kept = None
                        why = why or f"no {row.label} retrieval run yet"
                        break
                    r_kept.append(one)
            if kept is not None:
                log(f"[{i}/{len(entries)}] {e.label}: kept {path.name}")
                records.append(kept)
                retrieval_records.extend(r_kept)
                continue
            if why:
                log(f"[{i}/{len(entries)}] {e.label}: {why}")
        if e.quant == "gptq4":
            from ..runtime.gptq import model_group_size_problem

            problem = model_group_size_problem(base.model, e.group_size)
            if problem:
                log(f"[{i}/{len(entries)}] {e.label}: skipped, {problem}")
                continue
        t_load = time.perf_counter()
        embedder = Embedder(load_model(config.replace(max_length=reference.max_length)))  # loaded once for both
        load_s = time.perf_counter() - t_load
        run = drift_run(config, reference, cset, plan=e.plan, embedder=embedder)
        run.record["run"]["label"] = e.label
        run.record["speed"]["load_seconds"] = load_s
        write_json_atomic(path, run.record)
        q = run.report
        message = (f"[{i}/{len(entries)}] {e.label}: mean cosine {q.mean_cosine:.4f}, "
                   f"{run.record['memory']['weight_bytes']['total']:,} bytes")
        records.append(run.record)
        if retrieval is not None:
            r_config = config.replace(max_length=RETRIEVAL_MAX_LENGTH)
            r_embedder = Embedder(dataclasses.replace(embedder.loaded, config=r_config))  # same weights
            r_runs = retrieval_runs(r_config, retrieval.split, task=retrieval.task, instruction=retrieval.instruction,
                                    embedder=r_embedder, cache=retrieval.cache, plan=e.plan,
                                    vectors=list(retrieval.vectors))
            for row in retrieval.vectors:
                record = r_runs[row.label].record
                record["run"]["label"] = e.label
                write_json_atomic(retrieval_path(out_dir, e.label, row.label), record)
                retrieval_records.append(record)
            message += f", nDCG@10 {r_runs[FLOAT32.label].record['quality']['nDCG@10']:.4f}"
        log(message)
        del embedder
    if retrieval is not None:
        ref = next((r for r in retrieval_records if r["run"]["label"] == reference.mode
                    and vectors_of(r) == FLOAT32.label), None)
        if ref is None:
            log(f"no {reference.mode} run in the grid: retrieval retention is not computed")
        add_vector_retention(retrieval_records)
        for r in retrieval_records:
            if ref is not None and r is not ref:
                add_retention(r, ref)
            write_json_atomic(retrieval_path(out_dir, r["run"]["label"], vectors_of(r)), r)
    return records, retrieval_records


def float32_rows(retrieval_records: list[dict]) -> list[dict]:
    return [r for r in retrieval_records if vectors_of(r) == FLOAT32.label]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (smaller x and smaller y are better)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def retention_cell(record: dict | None, measure: str = "nDCG@10", key: str = "retention") -> str:
    if record is None:
        return "-"
    retention = record["quality"].get(key)
    if retention is None:
        return "(reference)"
    r = retention[measure]
    return f"{r['retention']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def markdown_table(records: list[dict], retrieval_records: list[dict] | None = None) -> str:
    int8 = next((r for r in records if r["run"]["label"] == "int8"), None)
    int8_bytes = int8["memory"]["weight_bytes"]["total"] if int8 else None
    points = [(r["memory"]["weight_bytes"]["total"], 1 - r["quality"]["mean_cosine"]) for r in records]
    front = set(pareto_front(points))
    by_label = {r["run"]["label"]: r for r in float32_rows(retrieval_records or [])}
    extra = " nDCG@10 | Recall@100 | MRR@10 | nDCG@10 retention [95% CI] |" if by_label else ""
    lines = ["| mode | weight bytes | vs int8 | mean cos | p5 cos | min cos | top-10 overlap | Spearman | Pareto |"
             + extra,
             "|---|---:|---:|---:|---:|---:|---:|---:|:-:|" + ("---:|---:|---:|---|" if by_label else "")]
    for i in sorted(range(len(records)), key=lambda i: -points[i][0]):
        r = records[i]
        q, b = r["quality"], r["memory"]["weight_bytes"]["total"]
        ratio = f"{b / int8_bytes:.2f}" if int8_bytes else "-"
        on_front = "*" if i in front else ""
        line = (f"| {r['run']['label']} | {b:,} | {ratio} | {q['mean_cosine']:.4f} | {q['p5_cosine']:.4f} | "
                f"{q['min_cosine']:.4f} | {q['top10_overlap']:.3f} | {q['spearman']:.4f} | {on_front} |")
        if by_label:
            rr = by_label.get(r["run"]["label"])
            rq = rr["quality"] if rr else {}
            line += "".join(f" {rq[m]:.4f} |" if m in rq else " - |" for m in ("nDCG@10", "Recall@100", "MRR@10"))
            line += f" {retention_cell(rr)} |"
        lines.append(line)
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _write_png(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())


def plot(records: list[dict], path: Path, title: str) -> None:
    plt = _pyplot()

    xs = [r["memory"]["weight_bytes"]["total"] / 2**20 for r in records]
    ys = [max(1 - r["quality"]["mean_cosine"], 1e-6) for r in records]
    front = pareto_front(list(zip(xs, ys)))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    mixed = [":" in r["run"]["label"] for r in records]
    ax.scatter([x for x, m in zip(xs, mixed) if not m], [y for y, m in zip(ys, mixed) if not m], label="plain modes")
    ax.scatter([x for x, m in zip(xs, mixed) if m], [y for y, m in zip(ys, mixed) if m], marker="s",
               label="mixed plans")
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "k--", lw=1, label="Pareto front")
    for x, y, r in zip(xs, ys, records):
        ax.annotate(r["run"]["label"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("weight bytes (MiB)")
    ax.set_ylabel("mean drift, 1 - mean cosine to reference (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _write_png(fig, path)


def plot_retention(retrieval_records: list[dict], path: Path, title: str, measure: str = "nDCG@10") -> None:
    """Memory against retrieval retention (mode / reference mode), with the 95 % bootstrap intervals."""
    plt = _pyplot()

    rows = [r for r in float32_rows(retrieval_records) if "retention" in r["quality"]]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for r in rows:
        x = r["memory"]["weight_bytes"]["total"] / 2**20
        ret = r["quality"]["retention"][measure]
        low, high = ret["ci95"]
        ax.errorbar([x], [ret["retention"]], yerr=[[ret["retention"] - low], [high - ret["retention"]]], fmt="s" if
                    ":" in r["run"]["label"] else "o", capsize=3, color="C1" if ":" in r["run"]["label"] else "C0")
        ax.annotate(r["run"]["label"], (x, ret["retention"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="reference mode")
    ax.set_xlabel("weight bytes (MiB)")
    ax.set_ylabel(f"{measure} retention (mode / reference), 95 % paired bootstrap")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _write_png(fig, path)


def index_memory_points(retrieval_records: list[dict], measure: str = "nDCG@10") -> list[tuple[float, float]]:
    """(bytes for a million documents, 1 - retention) per row; the reference row has retention 1."""
    points = []
    for r in retrieval_records:
        retention = r["quality"].get("retention", {}).get(measure, {}).get("retention", 1.0)
        points.append((float(r["memory"]["bytes_for_a_million_documents"]), 1.0 - retention))
    return points


def bits_cell(bits: dict | None) -> str:
    return f"{bits['mean_entropy']:.3f}, {bits['near_constant_share']:.1%}" if bits else "-"


def index_memory_table(retrieval_records: list[dict]) -> str:
    """One row per (weight mode x vector format): the three metrics, nDCG@10 retention against (reference weights,
    float32 vectors) with its interval, index bytes per document, and weights + a million documents' vectors."""
    points = index_memory_points(retrieval_records)
    front = set(pareto_front(points))
    lines = ["| weights | vectors | nDCG@10 | Recall@100 | MRR@10 | nDCG@10 retention [95% CI] | vs float32 vectors, "
             "same weights | bytes / document | weights + 10^6 documents (GB) | Pareto | bits: mean entropy, "
             "near-constant |", "|---|---|---:|---:|---:|---|---|---:|---:|:-:|---|"]
    for i in sorted(range(len(retrieval_records)), key=lambda i: -points[i][0]):
        r = retrieval_records[i]
        q, m = r["quality"], r["memory"]
        own = retention_cell(r, key="retention_vs_float32_vectors") if vectors_of(r) != FLOAT32.label else "-"
        lines.append(f"| {r['run']['label']} | {vectors_of(r)} | {q['nDCG@10']:.4f} | "
                     f"{q['Recall@100']:.4f} | {q['MRR@10']:.4f} | {retention_cell(r)} | {own} | "
                     f"{m['index_bytes_per_document']:,} | {m['bytes_for_a_million_documents'] / 1e9:.3f} | "
                     f"{'*' if i in front else ''} | {bits_cell(q.get('bits'))} |")
    return "\n".join(lines)


def plot_index_memory(retrieval_records: list[dict], path: Path, title: str, measure: str = "nDCG@10") -> None:
    """Weights + a million documents' vectors against retrieval retention, the Pareto front marked."""
    plt = _pyplot()

    shown = {(r["run"]["label"], vectors_of(r)) for r in retrieval_records}
    retrieval_records = [r for r in retrieval_records  # uint8 / ubinary rank exactly as int8 / binary: one point
                         if not (vectors_of(r).startswith("u") and (r["run"]["label"], vectors_of(r)[1:]) in shown)]
    points = index_memory_points(retrieval_records, measure)
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    weights = sorted({r["run"]["label"] for r in retrieval_records})
    for c, w in enumerate(weights):
        rows = [i for i, r in enumerate(retrieval_records) if r["run"]["label"] == w]
        for i in rows:
            r = retrieval_records[i]
            ret = r["quality"].get("retention", {}).get(measure)
            y = ret["retention"] if ret else 1.0
            yerr = [[y - ret["ci95"][0]], [ret["ci95"][1] - y]] if ret else None
            ax.errorbar([points[i][0] / 1e9], [y], yerr=yerr, fmt="o", capsize=2, color=f"C{c}",
                        label=w if i == rows[0] else None)
            ax.annotate(vectors_of(r), (points[i][0] / 1e9, y), fontsize=6,
                        xytext=(4, 2), textcoords="offset points")
    ax.plot([points[i][0] / 1e9 for i in front], [1 - points[i][1] for i in front], "k--", lw=1,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("weight bytes + a million documents' vectors (GB, log)")
    ax.set_ylabel(f"{measure} retention vs (reference weights, float32 vectors), 95 % CI")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="weights")
    _write_png(fig, path)
