"""The condensed weight x vector-format table of README.md and docs/index-memory.md, from the records that
`lowmem-e5 compare --vectors ... --out-dir calibration/results/index_memory/PART` wrote for each labelled part.

    python scripts/index_memory_table.py                 # both parts, the README's rows
    python scripts/index_memory_table.py --all           # every vector row

Beside the stand-in's own bytes, each row gives E5-Mistral-7B's: its weight bytes from the planner (fp16 for the
fp32 reference row, 16-bit compute on a GPU) and 10^6 documents of 4,096 dimensions in that vector format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "calibration/results/index_memory"
SHOWN = ("float32", "float16", "int8", "binary", "binary+rescore4", "binary:centred", "binary:centred+rescore4")


def records(part: str) -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted((RESULTS / part).glob("*.retrieval.json")):
        r = json.loads(path.read_text())
        out[(r["run"]["label"], r["run"].get("vectors", "float32"))] = r
    return out


def cell(record: dict, key: str) -> str:
    r = record["quality"].get(key)
    if r is None:
        return "1 (ref.)"
    r = r["nDCG@10"]
    return f"{r['retention']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def e5_bytes(weights: str, vectors: str) -> int:
    from lowmem_e5.quality.planner import e5_mistral_config, meta_model, plan_weights
    from lowmem_e5.runtime.vector_formats import VectorFormat

    quant = "fp16" if weights == "fp32" else weights
    w = plan_weights(meta_model(e5_mistral_config()), quant, False, "float16").total
    return w + 10**6 * VectorFormat.parse(vectors.split("+")[0]).bytes_per_vector(4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="packages,code")
    ap.add_argument("--all", action="store_true", help="every vector row, not only the README's")
    args = ap.parse_args()
    parts = args.parts.split(",")
    grids = {p: records(p) for p in parts}
    keys = [k for k in grids[parts[0]] if args.all or k[1] in SHOWN]
    order = {v: i for i, v in enumerate(SHOWN)}
    keys.sort(key=lambda k: (("fp32", "int8", "nf4").index(k[0]), order.get(k[1], 99), k[1]))
    head = "| weights | vectors | " + " | ".join(
        f"{p}: nDCG@10 retention [95% CI] | {p}: vs float32 vectors" for p in parts) + \
        " | bytes / doc (576 d) | E5-Mistral-7B: weights + 10^6 docs (GB) |"
    print(head)
    print("|---|---|" + "---|---|" * len(parts) + "---:|---:|")
    for k in keys:
        first = grids[parts[0]][k]
        own = [cell(grids[p][k], "retention_vs_float32_vectors") if k[1] != "float32" else "-" for p in parts]
        cells = " | ".join(f"{cell(grids[p][k], 'retention')} | {o}" for p, o in zip(parts, own))
        print(f"| {k[0]} | {k[1]} | {cells} | {first['memory']['index_bytes_per_document']:,} | "
              f"{e5_bytes(*k) / 1e9:.2f} |")


if __name__ == "__main__":
    main()
