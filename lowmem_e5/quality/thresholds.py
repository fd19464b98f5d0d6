"""Drift gates per mode, in one place: a mode whose drift passes these is fit to ship on the default model.

Measured on the default small model (SmolLM2-135M as MistralModel), calibration set v1, held-out split, texts up to
600 characters (all under 512 tokens, so max_length does not cut them), CPU fp32 compute (see README "Drift gates" for the run and the command); each gate
sits below the measured value by a margin for library and machine noise. Double quantisation shares its base
mode's gate. They bind the small model only: a 7B model drifts less, and gets its own gates once measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from .drift import DriftReport


@dataclass(frozen=True)
class DriftGate:
    min_mean_cosine: float
    min_min_cosine: float
    min_top10_overlap: float


# measured (heldout, <= 600 chars, 49 texts): mean / min / top-10 overlap -> gate
DRIFT_GATES: dict[str, DriftGate] = {
    "fp32": DriftGate(0.9999, 0.9999, 0.99),  # 1.0000 / 1.0000 / 1.000
    "fp16": DriftGate(0.9995, 0.999, 0.95),  # 1.0000 / 1.0000 / 0.992
    "bf16": DriftGate(0.999, 0.995, 0.90),  # 0.9996 / 0.9986 / 0.975
    "int8": DriftGate(0.985, 0.94, 0.75),  # 0.9910 / 0.9622 / 0.867
    "nf4": DriftGate(0.89, 0.76, 0.55),  # 0.9082 / 0.7976 / 0.692 (double quant: 0.9085 / 0.8024 / 0.683)
    "fp4": DriftGate(0.82, 0.50, 0.65),  # 0.8468 / 0.5814 / 0.800 (double quant: 0.8489 / 0.5840 / 0.783)
}


def gate_for(quant: str) -> DriftGate:
    if quant not in DRIFT_GATES:
        raise ValueError(f"no drift gate for quant={quant!r}; expected one of: {', '.join(DRIFT_GATES)}")
    return DRIFT_GATES[quant]


def gate_failures(report: DriftReport, quant: str) -> list[str]:
    gate = gate_for(quant)
    failures = []
    if report.mean_cosine < gate.min_mean_cosine:
        failures.append(f"mean cosine {report.mean_cosine:.4f} < {gate.min_mean_cosine}")
    if report.min_cosine < gate.min_min_cosine:
        failures.append(f"min cosine {report.min_cosine:.4f} < {gate.min_min_cosine}")
    if report.top10_overlap < gate.min_top10_overlap:
        failures.append(f"top-10 overlap {report.top10_overlap:.3f} < {gate.min_top10_overlap}")
    return failures
