"""Quality runs: embed (part of) the calibration set in one mode and measure its drift from the reference."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..results import mode_label, result_record, slug
from ..runtime.calibration_set import CALIBRATION_DIR, CalibrationSet
from ..runtime.config import FULL_PRECISION_DTYPES, RuntimeConfig
from ..runtime.encoder import Embedder
from ..runtime.fingerprint import model_identity
from ..runtime.loading import load_model
from ..runtime.sources import resolve_model_source
from .drift import DriftReport, measure_drift
from .reference import Reference, embed_calibration, encode_calibration, write_reference

REFERENCE_DIR = CALIBRATION_DIR / "references"
CALIBRATION_MAX_LENGTH = 1024  # past the 512 of the official evaluation, so long texts are exercised


def default_reference_path(model: str) -> Path:
    return REFERENCE_DIR / f"{slug(model)}.safetensors"


def reference_mode(device: str) -> str:
    return "fp32" if device == "cpu" else "fp16"


def make_reference(config: RuntimeConfig, cset: CalibrationSet, output: Path) -> tuple[Reference, float]:
    if config.quant not in FULL_PRECISION_DTYPES:
        raise ValueError(f"quant={config.quant!r} is not valid for a reference; expected one of: "
                         f"{', '.join(FULL_PRECISION_DTYPES)}")
    embedder = Embedder(load_model(config))
    t0 = time.perf_counter()
    vectors = embed_calibration(embedder, cset)
    seconds = time.perf_counter() - t0
    ref = write_reference(output, vectors, cset, embedder.loaded.source, config.quant, config.max_length)
    return ref, seconds


@dataclass(frozen=True)
class DriftRun:
    report: DriftReport
    record: dict
    embeddings: np.ndarray


def reference_rows(reference: Reference, cset: CalibrationSet) -> np.ndarray:
    index = {rid: i for i, rid in enumerate(reference.ids)}
    missing = [r.id for r in cset.rows if r.id not in index]
    if missing:
        raise ValueError(f"the reference lacks {len(missing)} calibration rows (first: {missing[0]})")
    return reference.embeddings[[index[r.id] for r in cset.rows]]


def drift_run(config: RuntimeConfig, reference: Reference, cset: CalibrationSet, *, plan: str | None = None,
              embedder: Embedder | None = None, adapter: str | None = None) -> DriftRun:
    """cset: the rows to measure (a split or subset of the reference's set)."""
    config = config.replace(max_length=reference.max_length)  # same truncation as the reference
    source, _ = resolve_model_source(config.model)
    reference.check_model(source)
    t_load = time.perf_counter()
    embedder = embedder or Embedder(load_model(config))
    load_s = time.perf_counter() - t_load
    t0 = time.perf_counter()
    vectors, stats = encode_calibration(embedder, cset, adapter=adapter)
    seconds = time.perf_counter() - t0
    tokens = stats.real_tokens
    report = measure_drift(vectors, reference_rows(reference, cset), cset)
    record = result_record(
        run={"mode": mode_label(config.quant, config.double_quant, plan,
                                 config.group_size if config.quant == "gptq4" else None), "config": config.to_dict(),
             "model_source": source, "model_fingerprint": model_identity(source), "set_version": cset.version,
             "n_texts": len(cset.rows),
             "reference_mode": reference.mode, "max_length": reference.max_length},
        quality=report.to_dict(),
        memory={"weight_bytes": embedder.loaded.weight_bytes.to_dict()},
        speed={"encode_seconds": seconds, "load_seconds": load_s, "real_tokens": tokens,
               "tokens_per_second": tokens / seconds if seconds else None},
    )
    return DriftRun(report=report, record=record, embeddings=vectors)
