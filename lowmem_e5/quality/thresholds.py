"""Drift gates per mode, in one place: a mode whose drift passes these is fit to ship on the default model.

Measured on the default small model (SmolLM2-135M as MistralModel with its E5-recipe LoRA merged), calibration set
v1, held-out split, texts up to 600 characters (all under 512 tokens, so max_length does not cut them), CPU fp32
compute (see README "Drift gates" for the run and the command); each gate sits below the measured value by a margin
for library and machine noise. Double quantisation shares its base mode's gate. They bind the small model only: a 7B
model drifts differently, and gets its own gates once measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from .drift import DriftReport


@dataclass(frozen=True)
class DriftGate:
    min_mean_cosine: float
    min_min_cosine: float
    min_top10_overlap: float


# measured (heldout, <= 600 chars, 49 texts; calibration/results/drift_gates/): mean / min / top-10 overlap -> gate
DRIFT_GATES: dict[str, DriftGate] = {
    "fp32": DriftGate(0.9999, 0.9999, 0.99),  # 1.0000 / 1.0000 / 1.000
    "fp16": DriftGate(0.9995, 0.999, 0.95),  # 1.0000 / 1.0000 / 1.000
    "bf16": DriftGate(0.999, 0.998, 0.90),  # 0.9999 / 0.9997 / 0.967
    "int8": DriftGate(0.993, 0.965, 0.85),  # 0.9960 / 0.9801 / 0.967
    "nf4": DriftGate(0.945, 0.91, 0.70),  # 0.9597 / 0.9345 / 0.842 (double quant: 0.9597 / 0.9326 / 0.833)
    "fp4": DriftGate(0.895, 0.82, 0.62),  # 0.9109 / 0.8543 / 0.750 (double quant: 0.9111 / 0.8532 / 0.750)
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
