"""How centred sign bits should be scored: five scores of a float query against documents stored as sign(x - centre),
each over every document (no Hamming pre-selection), as nDCG@10 retention against the same model's float32 search.

    python scripts/centred_binary_scoring.py     # ~2 min: document vectors come from retrieval's cache

Needs the document embeddings `lowmem-e5 compare --beir ...` (or `retrieval`) cached for the default model in fp32
and nf4 on both labelled parts; writes calibration/results/index_memory/centred_scoring.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowmem_e5 import Embedder, RuntimeConfig, load_model  # noqa: E402
from lowmem_e5.jobs.atomic import write_json_atomic  # noqa: E402
from lowmem_e5.quality.beir import load_beir, suggested_instruction  # noqa: E402
from lowmem_e5.quality.retrieval import RETRIEVAL_MAX_LENGTH, DocumentCache, calibration_sample  # noqa: E402
from lowmem_e5.quality.retrieval_metrics import per_query_scores, run_from_search, summarize  # noqa: E402
from lowmem_e5.results import environment  # noqa: E402
from lowmem_e5.runtime.vector_formats import VectorCalibration  # noqa: E402

OUT = ROOT / "calibration/results/index_memory/centred_scoring.json"


def ndcg(split, scores: np.ndarray) -> float:
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    run = run_from_search(split.query_ids, split.doc_ids, idx, np.take_along_axis(scores, idx, axis=1))
    return summarize(per_query_scores(split.qrels, run, split.query_ids))["nDCG@10"]


def main() -> None:
    rows = []
    for part in ("packages", "code"):
        split = load_beir(ROOT / "calibration/labelled_v1" / part, "test")
        for quant in ("fp32", "nf4"):
            config = RuntimeConfig(model="default", quant=quant, max_length=RETRIEVAL_MAX_LENGTH)
            embedder = Embedder(load_model(config))
            key = DocumentCache.key(embedder.loaded.source, config, None, split.corpus_sha256)
            docs = DocumentCache().get(key, len(split.doc_ids))
            if docs is None:
                raise SystemExit(f"no cached document vectors for {part} in {quant}: run `lowmem-e5 retrieval --beir "
                                 f"calibration/labelled_v1/{part} --quant {quant}` first")
            queries = embedder.encode_queries(split.query_texts, instruction=suggested_instruction(split.root))
            centre = VectorCalibration.from_vectors(calibration_sample(docs), {}).centre
            signs = np.where(docs - centre > 0, 1.0, -1.0).astype(np.float32)
            spread = np.abs(docs - centre).mean(axis=0)
            variants = {
                "hamming: sign(q - c) . s": np.where(queries - centre > 0, 1.0, -1.0) @ signs.T,
                "(q - c) . s (ours)": (queries - centre) @ signs.T,
                "q . s (as plain binary rescores)": queries @ signs.T,
                "(q - c) . (spread * s)": (queries - centre) @ (spread * signs).T,
                "q . (c + spread * s) (a reconstruction)": queries @ (centre + spread * signs).T,
            }
            full = ndcg(split, queries @ docs.T)
            row = {"part": part, "weights": quant, "float32_nDCG@10": full,
                   "centre_norm": float(np.linalg.norm(centre)),
                   "mean_query_norm": float(np.linalg.norm(queries.mean(axis=0))),
                   "retention": {name: ndcg(split, s) / full for name, s in variants.items()}}
            print(part, quant, {k: round(v, 3) for k, v in row["retention"].items()}, flush=True)
            rows.append(row)
    write_json_atomic(OUT, {"command": "python scripts/centred_binary_scoring.py", "rows": rows,
                            "environment": environment()})
    print(OUT)


if __name__ == "__main__":
    main()
