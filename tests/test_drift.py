"""Drift against the full-precision reference: every mode within its gate, and a broken pipeline caught."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lowmem_e5.runtime.encoder as encoder_module
from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.errors import InputError
from lowmem_e5.quality.evaluation import drift_run
from lowmem_e5.quality.reference import embed_calibration, read_reference, write_reference
from lowmem_e5.quality.thresholds import DRIFT_GATES, gate_failures
from lowmem_e5.runtime.calibration_set import load_calibration_set
from lowmem_e5.runtime.pooling import last_token_indices


@pytest.fixture(scope="module")
def subset():
    # What the gates were measured on: held-out split, texts up to 600 characters (no long ones: fast on CPU).
    return load_calibration_set().select("heldout", max_chars=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, real_fp32, subset):
    path = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    write_reference(path, embed_calibration(real_fp32, subset), subset, real_fp32.loaded.source, "fp32", 512)
    return read_reference(path)


def test_calibration_set_is_real_varied_and_split(subset):
    full = load_calibration_set()
    assert len(full.rows) >= 128
    kinds = {r.kind for r in full.rows}
    langs = {r.lang for r in full.rows}
    contents = {r.content for r in full.rows}
    assert kinds == {"query", "document"} and len(langs) >= 6 and {"code", "long", "translation"} <= contents
    assert {r.split for r in full.rows} == {"tune", "heldout"}
    assert all(r.task for r in full.rows if r.kind == "query") and all(r.source for r in full.rows)
    assert len(subset.queries()) >= 8 and len(subset.documents()) >= 20


def test_reference_round_trips_with_its_fingerprint(reference, subset, real_fp32):
    assert reference.ids == subset.ids and reference.embeddings.shape == (len(subset.rows), 576)
    assert reference.mode == "fp32" and reference.set_sha256 == subset.sha256
    reference.check_model(real_fp32.loaded.source)  # same model: no error


def test_a_reference_of_another_model_is_refused(reference, tiny_model_dir):
    with pytest.raises(InputError, match="the reference was made from another model .*config_sha256.*weights_sha256"):
        reference.check_model(str(tiny_model_dir))


# bf16 is 5-6x slower than fp32 on CPUs without AVX512-BF16, and fp4 drifts most: both gates are `slow`; their fast
# tests are on the tiny model (test_quantization.py, test_planner.py, test_checkpoints.py)
@pytest.mark.parametrize("quant, double_quant", [pytest.param("bf16", False, marks=pytest.mark.slow), ("int8", False),
                                                  ("nf4", False), ("nf4", True),
                                                  pytest.param("fp4", False, marks=pytest.mark.slow)])
def test_mode_drift_stays_within_its_gate(reference, subset, real_model_dir, quant, double_quant):
    config = RuntimeConfig(model=str(real_model_dir), quant=quant, double_quant=double_quant)
    run = drift_run(config, reference, subset)
    assert gate_failures(run.report, quant) == [], run.report.to_dict()
    assert run.record["memory"]["weight_bytes"]["total"] > 0 and run.record["speed"]["encode_seconds"] > 0
    assert set(run.record) == {"run", "quality", "memory", "speed", "environment"}


def test_gates_are_ordered_by_precision():
    order = ["fp32", "fp16", "bf16", "int8", "nf4", "fp4"]
    means = [DRIFT_GATES[m].min_mean_cosine for m in order]
    assert means == sorted(means, reverse=True)


def test_dropping_the_eos_fails_the_drift_check(reference, subset, real_fp32, monkeypatch):
    real_tokenize = encoder_module.tokenize

    def tokenize_without_eos(*args, **kwargs):  # the transformers >= 5 trap: rows end on a content token
        tok = real_tokenize(*args, **kwargs)
        return type(tok)(rows=[r[:-1] for r in tok.rows], truncated=tok.truncated)

    monkeypatch.setattr(encoder_module, "tokenize", tokenize_without_eos)
    run = drift_run(real_fp32.config, reference, subset, embedder=real_fp32)
    assert gate_failures(run.report, "fp32")
    assert gate_failures(run.report, "int8"), run.report.to_dict()  # worse than int8 quantisation


@pytest.mark.slow  # 23 s; its fast twin: test_dropping_the_eos_fails_the_drift_check
def test_a_wrong_pooling_index_fails_the_drift_check(reference, subset, real_fp32, monkeypatch):
    def pool_one_before_last(hidden, mask):
        idx = last_token_indices(mask) - 1
        return hidden[torch.arange(hidden.shape[0]), idx]

    monkeypatch.setattr(encoder_module, "last_token_pool", pool_one_before_last)
    run = drift_run(real_fp32.config, reference, subset, embedder=real_fp32)
    assert gate_failures(run.report, "nf4"), run.report.to_dict()


def test_drift_cli_writes_a_result_record_and_checks_the_gate(reference, tmp_path, real_model_dir, subset):
    from lowmem_e5.quality.reference import write_reference as write

    ref_path = tmp_path / "ref.safetensors"
    write(ref_path, reference.embeddings, subset, str(real_model_dir), "fp32", 512)
    out = tmp_path / "int8.json"
    r = subprocess.run([sys.executable, "-m", "lowmem_e5", "drift", "--quant", "int8", "--reference", ref_path,
                        "--split", "heldout", "--max-chars", "600", "--check", "--output", out],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert record["run"]["mode"] == "int8" and record["quality"]["gate_failures"] == []
    assert np.isclose(record["quality"]["mean_cosine"], json.loads(r.stdout)["mean_cosine"])


@pytest.mark.slow  # 26 s; the gate itself is checked fast by test_mode_drift_stays_within_its_gate
def test_drift_cli_exits_1_when_the_gate_fails(tmp_path, real_model_dir, subset):
    # A "reference" made in int8: fp32 measured against it drifts past the fp32 gate.
    int8 = Embedder(load_model(RuntimeConfig(model=str(real_model_dir), quant="int8")))
    ref_path = tmp_path / "int8-ref.safetensors"
    write_reference(ref_path, embed_calibration(int8, subset), subset, str(real_model_dir), "fp32", 512)
    r = subprocess.run([sys.executable, "-m", "lowmem_e5", "drift", "--quant", "fp32", "--reference", ref_path,
                        "--split", "heldout", "--max-chars", "600", "--check"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "drift past the fp32 gate: mean cosine 0.9" in r.stderr
