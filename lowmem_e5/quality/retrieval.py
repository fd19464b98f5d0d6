"""One retrieval run: embed a BEIR split's documents (cached) and queries in one mode, search all documents exactly,
score with ir-measures; and retention against a reference mode's run with paired bootstrap intervals."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..jobs.atomic import save_npy_atomic
from ..jobs.corpus_job import config_identity
from ..results import mode_label, result_record
from ..runtime.config import RuntimeConfig
from ..runtime.encoder import Embedder
from ..runtime.fingerprint import adapter_fingerprint, model_identity
from ..runtime.loading import load_model
from ..runtime.vector_formats import (
    VectorCalibration,
    VectorFormat,
    check_rescore,
    index_identity,
    packed_bits,
    quantize,
    sample_indices,
)
from .beir import BeirSplit
from .retrieval_metrics import (
    MEASURES,
    SEARCH_DEPTH,
    paired_bootstrap_retention,
    per_query_scores,
    run_from_search,
    summarize,
)
from .vector_search import search_codes

RETRIEVAL_MAX_LENGTH = 512  # the official E5 BEIR evaluation's
DOCUMENT_CACHE_VERSION = 1  # bump when the document text format changes
MILLION = 10**6


def default_cache_dir() -> Path:
    return Path(os.environ.get("LOWMEM_E5_CACHE", Path.home() / ".cache" / "lowmem_e5")) / "document_embeddings"


class DocumentCache:
    """Document embeddings per (model fingerprint, settings that change vectors, adapter, corpus sha256): a compare
    grid embeds each corpus once per mode, and a rerun not at all. One .npy per key, written atomically."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder else default_cache_dir()

    @staticmethod
    def key(model_source: str, config: RuntimeConfig, adapter: str | None, corpus_sha256: str) -> str:
        identity = {"version": DOCUMENT_CACHE_VERSION, "model": model_identity(model_source),
                    "config": config_identity(config),
                    "adapter": adapter_fingerprint(adapter) if adapter else None, "corpus_sha256": corpus_sha256}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, key: str, rows: int) -> np.ndarray | None:
        path = self.folder / f"{key}.npy"
        if not path.is_file():
            return None
        vectors = np.load(path, allow_pickle=False)
        return vectors if vectors.shape[0] == rows else None

    def put(self, key: str, vectors: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(self.folder / f"{key}.npy", vectors)


def _encode(encode, texts: list[str], desc: str, progress: bool, **kwargs) -> np.ndarray:
    if not progress:
        return encode(texts, **kwargs)
    from tqdm import tqdm

    with tqdm(total=len(texts), desc=desc, unit="text") as bar:
        return encode(texts, on_batch=bar.update, **kwargs)


@dataclass(frozen=True)
class RetrievalRun:
    record: dict
    per_query: dict[str, np.ndarray]  # measure -> value per query, in the split's query order


@dataclass(frozen=True)
class VectorRow:
    """How the documents are stored and searched in one row: a vector format and, for binary ones, the rescoring
    factor (0: Hamming distance only)."""

    fmt: VectorFormat = VectorFormat()
    rescore: int = 0

    def __post_init__(self) -> None:
        check_rescore(self.fmt, self.rescore)

    @property
    def label(self) -> str:
        return f"{self.fmt}+rescore{self.rescore}" if self.rescore else str(self.fmt)


FLOAT32 = VectorRow()
CALIBRATION_SAMPLE = 1000  # documents whose vectors set the int8/uint8 ranges and the binary centre


def vector_rows(formats: list[VectorFormat], rescores: list[int]) -> list[VectorRow]:
    """One row per format, binary ones once per rescoring factor; float32 first (the retention's reference)."""
    rows = [FLOAT32]
    for fmt in formats:
        for rescore in (rescores if fmt.is_binary else [0]):
            row = VectorRow(fmt, rescore)
            if row not in rows:
                rows.append(row)
    return rows


def calibration_sample(vectors: np.ndarray, rows: int = CALIBRATION_SAMPLE, seed: int = 0) -> np.ndarray:
    """A fixed random sample of document vectors (all of them when there are fewer)."""
    return vectors[sample_indices(len(vectors), rows, seed)]


def retrieval_runs(config: RuntimeConfig, split: BeirSplit, *, task: str | None = None,
                   instruction: str | None = None, adapter: str | None = None, embedder: Embedder | None = None,
                   cache: DocumentCache | None = None, plan: str | None = None, progress: bool = False,
                   vectors: list[VectorRow] | None = None) -> dict[str, RetrievalRun]:
    """Embed the split once in this mode and search it once per vector row (default: float32 only); a run per row,
    by its label. Documents stored as codes, queries in float32; int8/uint8 ranges and the binary centre from a
    sample of the split's own document vectors in this mode (`CALIBRATION_SAMPLE`).
    adapter: a peft folder applied to queries and documents. cache: None for the default folder. progress: bars on
    stderr for documents and queries."""
    cache = cache or DocumentCache()
    t_load = time.perf_counter()
    embedder = embedder or Embedder(load_model(config))
    load_s = time.perf_counter() - t_load
    adapter_name = None
    if adapter:
        adapter_name = "retrieval"
        if adapter_name not in embedder.adapters.names:
            embedder.load_adapter(adapter_name, adapter)
    source = embedder.loaded.source
    key = cache.key(source, config, adapter, split.corpus_sha256)
    t0 = time.perf_counter()
    doc_vectors = cache.get(key, len(split.doc_ids))
    cached = doc_vectors is not None
    label = mode_label(config.quant, config.double_quant, plan, config.group_size if config.quant == "gptq4" else None)
    if not cached:
        doc_vectors = _encode(embedder.encode_documents, split.doc_texts, f"{label} documents", progress,
                              adapter=adapter_name)
        cache.put(key, doc_vectors)
    doc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    query_vectors = _encode(embedder.encode_queries, split.query_texts, f"{label} queries", progress, task=task,
                            instruction=instruction, adapter=adapter_name)
    query_s = time.perf_counter() - t0
    rows = vectors or [FLOAT32]
    calibration = None
    if any(row.fmt.needs_calibration for row in rows):
        calibration = VectorCalibration.from_vectors(
            calibration_sample(doc_vectors), index_identity(source, config, adapter),
            {"source": "the split's documents", "corpus_sha256": split.corpus_sha256})
    weight_bytes = embedder.loaded.weight_bytes
    dimensions = int(doc_vectors.shape[1])
    fingerprint = model_identity(source)
    anisotropy = {"mean_vector_norm": float(np.linalg.norm(doc_vectors.mean(axis=0)))}
    runs = {}
    for row in rows:
        t0 = time.perf_counter()
        codes = quantize(doc_vectors, row.fmt, calibration)
        indices, scores = search_codes(query_vectors, codes, row.fmt, calibration, k=SEARCH_DEPTH,
                                       rescore=row.rescore)
        search_s = time.perf_counter() - t0
        per_query = per_query_scores(split.qrels, run_from_search(split.query_ids, split.doc_ids, indices, scores),
                                     split.query_ids)
        per_doc = row.fmt.bytes_per_vector(dimensions)
        quality_extra = {"bits": bit_balance(codes, row.fmt, dimensions)} if row.fmt.is_binary else {}
        record = result_record(
            run={"mode": label, "vectors": row.label, "config": config.to_dict(), "model_source": source,
                 "model_fingerprint": fingerprint, **split.describe(), "task": task,
                 "instruction": instruction, "adapter": str(adapter) if adapter else None,
                 "vector_format": {"format": row.fmt.name, "centred": row.fmt.centred, "rescore": row.rescore,
                                   "dimensions": dimensions,
                                   "calibration_rows": calibration.sample["rows"]
                                   if calibration is not None and row.fmt.needs_calibration else None}},
            quality={**summarize(per_query), **quality_extra,
                     "anisotropy": anisotropy,
                     "per_query": {"query_ids": split.query_ids, **{m: v.tolist() for m, v in per_query.items()}}},
            memory={"weight_bytes": weight_bytes.to_dict(), "index_bytes_per_document": per_doc,
                    "index_bytes": per_doc * len(split.doc_ids),
                    "bytes_for_a_million_documents": weight_bytes.total + MILLION * per_doc},
            speed={"load_seconds": load_s, "document_seconds": doc_s, "documents_from_cache": cached,
                   "query_seconds": query_s, "search_seconds": search_s},
        )
        runs[row.label] = RetrievalRun(record=record, per_query=per_query)
    return runs


def bit_balance(codes: np.ndarray, fmt: VectorFormat, dimensions: int) -> dict:
    """How much the documents' sign bits can tell them apart: the mean entropy of a bit over the documents (1.0: set
    in half of them) and the share of bits that are the same in at least 95 % of the documents."""
    ones = np.unpackbits(packed_bits(codes, fmt), axis=1, count=dimensions).mean(axis=0)
    p = np.clip(ones, 1e-12, 1 - 1e-12)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return {"mean_entropy": float(entropy.mean()),
            "near_constant_share": float(((ones >= 0.95) | (ones <= 0.05)).mean())}


def retrieval_run(config: RuntimeConfig, split: BeirSplit, **kwargs) -> RetrievalRun:
    """`retrieval_runs` with float32 vectors: one run."""
    return retrieval_runs(config, split, **kwargs)[FLOAT32.label]


def per_query_from_record(record: dict) -> dict[str, np.ndarray]:
    stored = record["quality"]["per_query"]
    return {m: np.asarray(stored[m]) for m in MEASURES}


def add_retention(record: dict, reference: dict, key: str = "retention") -> None:
    """Put each measure's retention against the reference run (same split, same queries) into record['quality'][key]:
    "retention" against the reference weights' float32 vectors, "retention_vs_float32_vectors" against the same
    weights' float32 vectors (what the vector format alone costs)."""
    ours, theirs = record["quality"]["per_query"], reference["quality"]["per_query"]
    if ours["query_ids"] != theirs["query_ids"]:
        raise ValueError("the reference run scored other queries; expected the same BEIR split")
    mine, ref = per_query_from_record(record), per_query_from_record(reference)
    record["quality"][key] = {
        "reference_mode": reference["run"]["mode"], "reference_vectors": vectors_of(reference),
        **{m: paired_bootstrap_retention(mine[m], ref[m]).to_dict() for m in MEASURES}}


def vectors_of(record: dict) -> str:
    """A retrieval record's vector row (records written before vector formats were float32)."""
    return record["run"].get("vectors", FLOAT32.label)


def add_vector_retention(records: list[dict]) -> None:
    """Each non-float32 row's retention against the float32 row of its own weights, where the list has it."""
    float32 = {r["run"].get("label", r["run"]["mode"]): r for r in records if vectors_of(r) == FLOAT32.label}
    for r in records:
        own = float32.get(r["run"].get("label", r["run"]["mode"]))
        if own is not None and r is not own:
            add_retention(r, own, key="retention_vs_float32_vectors")
