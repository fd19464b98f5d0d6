"""Exact top-k search of float queries over stored vectors in any format of `runtime.vector_formats`, in blocks.

float32 / float16 / int8 / uint8: the inner product of the float query with the stored (dequantised) vector.
binary / ubinary: the Hamming distance between the query's sign bits and the document's (no rescoring), or, with
`rescore=N`, the k x N nearest by Hamming distance rescored by the inner product of the float query with the
document's +-1 code, as Hugging Face's embedding-quantization write-up does. Ties go to the lower document index
everywhere, so a blocked search equals one full sort.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..runtime.vector_formats import VectorCalibration, VectorFormat, check_rescore, hamming, scores, sign_bits

BlockScores = Callable[[slice, slice], np.ndarray]  # (query rows, document rows) -> scores, larger is better


def blocked_top_k(n_queries: int, n_docs: int, k: int, block_scores: BlockScores, doc_chunk: int = 16384,
                  query_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents of every query by a score computed one query_chunk x doc_chunk block at a time. Returns
    (indices int64, scores), each queries x k, best first; ties go to the lower document index."""
    k = min(k, n_docs)
    top_idx = np.empty((n_queries, k), dtype=np.int64)
    top_score = None
    for q0 in range(0, n_queries, query_chunk):
        rows = slice(q0, min(q0 + query_chunk, n_queries))
        best_idx = best_score = None
        for d0 in range(0, n_docs, doc_chunk):
            block = block_scores(rows, slice(d0, min(d0 + doc_chunk, n_docs)))
            idx = np.broadcast_to(np.arange(d0, d0 + block.shape[1]), block.shape)
            cand_score = block if best_score is None else np.concatenate([best_score, block], axis=1)
            cand_idx = idx if best_idx is None else np.concatenate([best_idx, idx], axis=1)
            order = np.lexsort((cand_idx, -cand_score), axis=1)[:, :k]  # score descending, then index ascending
            best_score = np.take_along_axis(cand_score, order, axis=1)
            best_idx = np.take_along_axis(cand_idx, order, axis=1)
        if top_score is None:
            top_score = np.empty((n_queries, k), dtype=best_score.dtype)
        top_idx[rows], top_score[rows] = best_idx, best_score
    if top_score is None:
        top_score = np.empty((n_queries, k), dtype=np.float32)
    return top_idx, top_score


def exact_search(queries: np.ndarray, documents: np.ndarray, k: int = 100, doc_chunk: int = 16384,
                 query_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents of every query by inner product (vectors are L2-normalised: cosine), in fp32. Memory is one
    query_chunk x doc_chunk score block, not queries x documents."""
    queries = np.asarray(queries, dtype=np.float32)
    documents = np.asarray(documents, dtype=np.float32)
    return blocked_top_k(len(queries), len(documents), k, lambda q, d: queries[q] @ documents[d].T, doc_chunk,
                         query_chunk)


def search_codes(queries: np.ndarray, codes: np.ndarray, fmt: VectorFormat, calibration: VectorCalibration | None,
                 k: int = 100, rescore: int = 0, doc_chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Top-k stored codes for float queries. rescore (binary formats only): 0 ranks by Hamming distance (scores are
    minus the distance); N >= 1 takes the k x N nearest by Hamming distance and ranks them by the float query's
    inner product with their +-1 codes."""
    queries = np.asarray(queries, dtype=np.float32)
    codes = np.asarray(codes)
    check_rescore(fmt, rescore)
    if not fmt.is_binary:
        return blocked_top_k(len(queries), len(codes), k,
                             lambda q, d: scores(queries[q], codes[d], fmt, calibration), doc_chunk)
    query_bits = sign_bits(queries, fmt, calibration)
    width = max(1, codes.shape[1])
    hamming_docs = min(doc_chunk, 4096)
    query_chunk = max(1, 2**24 // (hamming_docs * width))  # the XOR block stays under 16 MiB
    idx, neg = blocked_top_k(len(queries), len(codes), k * max(rescore, 1),
                             lambda q, d: -hamming(query_bits[q], codes[d], fmt), hamming_docs, query_chunk)
    if not rescore:
        return idx, neg.astype(np.float32)
    out_idx = np.empty((len(queries), min(k, idx.shape[1])), dtype=np.int64)
    out_score = np.empty(out_idx.shape, dtype=np.float32)
    for i, (q, cand) in enumerate(zip(queries, idx)):
        s = scores(q[None], codes[cand], fmt, calibration)[0]
        order = np.lexsort((cand, -s))[:out_idx.shape[1]]
        out_idx[i], out_score[i] = cand[order], s[order]
    return out_idx, out_score
