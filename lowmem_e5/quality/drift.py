"""Cosine drift of quantised embeddings against the full-precision reference, and retrieval agreement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import spearmanr

from ..runtime.calibration_set import CalibrationSet
from ..runtime.pooling import cosine_matrix, rowwise_cosine

TOP_K = 10


@dataclass(frozen=True)
class DriftReport:
    n_texts: int
    mean_cosine: float
    p5_cosine: float
    min_cosine: float
    top10_overlap: float  # mean over queries of |top-10 docs (quantised) & top-10 docs (reference)| / 10
    spearman: float  # mean over queries of the rank correlation of their scores over all documents
    by_content: dict[str, float]  # mean cosine per content kind (prose, code, translation, long, numbers)
    per_text: list[float]

    @property
    def mean_drift(self) -> float:
        return 1.0 - self.mean_cosine

    def to_dict(self, with_per_text: bool = False) -> dict:
        d = asdict(self)
        if not with_per_text:
            d.pop("per_text")
        d["mean_drift"] = self.mean_drift
        return d


def measure_drift(embeddings: np.ndarray, reference: np.ndarray, cset: CalibrationSet) -> DriftReport:
    if embeddings.shape != reference.shape:
        raise ValueError(f"embeddings {embeddings.shape} and reference {reference.shape} differ in shape")
    cos = rowwise_cosine(embeddings, reference)  # fp32
    q, d = cset.queries(), cset.documents()
    overlaps, rhos = [], []
    if q and d:
        k = min(TOP_K, len(d))
        scores = cosine_matrix(embeddings[q], embeddings[d])  # (Q, D)
        ref_scores = cosine_matrix(reference[q], reference[d])
        for row, ref_row in zip(scores, ref_scores):
            top = set(np.argsort(-row)[:k].tolist())
            ref_top = set(np.argsort(-ref_row)[:k].tolist())
            overlaps.append(len(top & ref_top) / k)
            rhos.append(float(spearmanr(row, ref_row).statistic))
    by_content: dict[str, list[float]] = {}
    for row, c in zip(cset.rows, cos):
        by_content.setdefault(row.content, []).append(float(c))
    return DriftReport(
        n_texts=len(cos), mean_cosine=float(cos.mean()), p5_cosine=float(np.percentile(cos, 5)),
        min_cosine=float(cos.min()), top10_overlap=float(np.mean(overlaps)) if overlaps else float("nan"),
        spearman=float(np.mean(rhos)) if rhos else float("nan"),
        by_content={k: float(np.mean(v)) for k, v in sorted(by_content.items())}, per_text=[float(c) for c in cos],
    )
