"""Retrieval quality: exact search over every document, the IR metrics from ir-measures (pytrec_eval underneath; no
hand-written nDCG), and the retention of one mode against a reference mode with a paired bootstrap interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Our names for ir-measures' measures: MRR@10 is the mean of the reciprocal rank RR@10.
MEASURES = {"nDCG@10": "nDCG@10", "Recall@100": "R@100", "MRR@10": "RR@10"}
SEARCH_DEPTH = 100  # the deepest cut-off any measure reads


def run_from_search(query_ids: list[str], doc_ids: list[str], indices: np.ndarray, scores: np.ndarray,
                    ) -> dict[str, dict[str, float]]:
    """A TREC run: query id -> document id -> score. Ranks are made strictly decreasing by a tiny rank offset, so
    pytrec_eval (which breaks score ties by document id) ranks exactly as the search did."""
    run = {}
    for qid, idx, sc in zip(query_ids, indices, scores):
        k = len(idx)
        run[qid] = {doc_ids[i]: float(s) + 1e-6 * (k - r) / k for r, (i, s) in enumerate(zip(idx, sc))}
    return run


def per_query_scores(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
                     query_ids: list[str]) -> dict[str, np.ndarray]:
    """Our measure name -> one value per query, in query_ids order (a query the run misses scores 0)."""
    import ir_measures

    parsed = {name: ir_measures.parse_measure(spec) for name, spec in MEASURES.items()}
    by_measure: dict[str, dict[str, float]] = {name: {} for name in MEASURES}
    names = {str(m): name for name, m in parsed.items()}
    for metric in ir_measures.iter_calc(list(parsed.values()), qrels, run):
        by_measure[names[str(metric.measure)]][metric.query_id] = float(metric.value)
    return {name: np.array([values.get(q, 0.0) for q in query_ids]) for name, values in by_measure.items()}


@dataclass(frozen=True)
class Retention:
    """metric of a mode / metric of the reference mode (means over queries), with a paired bootstrap interval."""

    value: float
    low: float
    high: float
    resamples: int

    def to_dict(self) -> dict:
        return {"retention": self.value, "ci95": [self.low, self.high], "bootstrap_resamples": self.resamples}


def paired_bootstrap_retention(mode: np.ndarray, reference: np.ndarray, resamples: int = 2000,
                               seed: int = 0) -> Retention:
    """Queries are resampled with replacement, the same draw for both modes (paired): the interval of
    mean(mode) / mean(reference) says whether a loss is more than the noise of which queries were asked."""
    mode, reference = np.asarray(mode, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if mode.shape != reference.shape or mode.ndim != 1 or not len(mode):
        raise ValueError(f"expected two per-query arrays of one length; got {mode.shape} and {reference.shape}")
    if reference.sum() == 0:
        return Retention(float("nan"), float("nan"), float("nan"), resamples)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(mode), size=(resamples, len(mode)))
    ref_means = reference[draws].mean(axis=1)
    ratios = mode[draws].mean(axis=1) / np.where(ref_means == 0, np.nan, ref_means)
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return Retention(float(mode.mean() / reference.mean()), float(low), float(high), resamples)


def summarize(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) for name, values in per_query.items()}
