"""Does retrieval quality tell a working pipeline from broken ones? The default model (smollm2-e5, the E5-recipe
small model) on part of the labelled packages test split, the pipeline as `encode` runs it against four broken ones.

    python scripts/broken_pipelines.py   # -> calibration/results/retrieval/broken_pipelines.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_e5 import Embedder, RuntimeConfig, load_model  # noqa: E402
from lowmem_e5.jobs.atomic import write_json_atomic  # noqa: E402
from lowmem_e5.quality.beir import load_beir, suggested_instruction  # noqa: E402
from lowmem_e5.quality.retrieval_metrics import per_query_scores, run_from_search, summarize  # noqa: E402
from lowmem_e5.quality.vector_search import exact_search  # noqa: E402
from lowmem_e5.results import environment  # noqa: E402
from lowmem_e5.runtime.tokenization import TokenizedTexts  # noqa: E402

PACKAGES = ROOT / "calibration/labelled_v1/packages"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--others", type=int, default=60, help="documents no chosen query is judged against")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--out", type=Path, default=ROOT / "calibration/results/retrieval/broken_pipelines.json")
    args = ap.parse_args()
    split = load_beir(PACKAGES, "test")
    instruction = suggested_instruction(PACKAGES)
    qids = split.query_ids[:args.queries]
    relevant = {d for q in qids for d in split.qrels[q]}
    keep = [i for i, d in enumerate(split.doc_ids) if d in relevant] + \
        [i for i, d in enumerate(split.doc_ids) if d not in relevant][:args.others]
    doc_ids, doc_texts = [split.doc_ids[i] for i in keep], [split.doc_texts[i] for i in keep]
    qtexts = split.query_texts[:args.queries]
    t0 = time.perf_counter()
    e = Embedder(load_model(RuntimeConfig(model="smollm2-e5", quant="fp32", max_length=args.max_length)))

    def scores(queries, docs) -> dict:
        idx, sc = exact_search(queries, docs)
        return summarize(per_query_scores(split.qrels, run_from_search(qids, doc_ids, idx, sc), qids))

    def without_eos(texts, **kw):
        tok = e.tokenize(texts, **kw)
        return e.encode_tokenized(TokenizedTexts(rows=[r[:-1] for r in tok.rows], truncated=[]))[0]

    queries, docs = e.encode_queries(qtexts, instruction=instruction), e.encode_documents(doc_texts)
    pipelines = {
        "as encode runs it": scores(queries, docs),
        "documents embedded with the query instruction": scores(queries, e.encode_queries(doc_texts,
                                                                                           instruction=instruction)),
        "queries without their instruction": scores(e.encode_documents(qtexts), docs),
        "EOS dropped from every row": scores(without_eos(qtexts, query=True, instruction=instruction),
                                             without_eos(doc_texts)),
        "document vectors shuffled": scores(queries, docs[np.random.default_rng(0).permutation(len(docs))]),
    }
    result = {"command": "python " + " ".join(sys.argv), "model": "smollm2-e5", "queries": len(qids),
              "documents": len(doc_ids), "max_length": args.max_length, "pipelines": pipelines,
              "seconds": time.perf_counter() - t0, "environment": environment()}
    write_json_atomic(args.out, result)
    for name, s in pipelines.items():
        print(f"{name}: nDCG@10 {s['nDCG@10']:.3f}, MRR@10 {s['MRR@10']:.3f}")


if __name__ == "__main__":
    main()
