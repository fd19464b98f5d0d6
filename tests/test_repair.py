"""Drift repair: a LoRA trained on the quantised base towards the full-precision reference."""

import json

import numpy as np
import pytest

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.quality.reference import embed_calibration, read_reference, write_reference
from lowmem_e5.quality.repair import RepairConfig, repaired_drift, train_repair_adapter
from lowmem_e5.runtime.calibration_set import load_calibration_set

from .conftest import DATA


def make_reference(tmp_path, model_dir, cset, max_length=256):
    fp32 = Embedder(load_model(RuntimeConfig(model=str(model_dir), quant="fp32", max_length=max_length)))
    path = tmp_path / "ref.safetensors"
    write_reference(path, embed_calibration(fp32, cset), cset, str(model_dir), "fp32", max_length)
    return read_reference(path)


def test_repair_trains_a_loadable_adapter_that_pulls_towards_the_reference(tmp_path, tiny_model_dir):
    cset = load_calibration_set().select("tune", max_chars=200)
    reference = make_reference(tmp_path, tiny_model_dir, cset)
    config = RuntimeConfig(model=str(tiny_model_dir), quant="nf4")
    out = tmp_path / "repair"
    log = train_repair_adapter(config, reference, cset, RepairConfig(rank=4, epochs=4, batch_size=8, lr=2e-3), out,
                               progress=False)
    assert {"adapter_config.json", "adapter_model.safetensors", "repair.json"} <= {p.name for p in out.iterdir()}
    assert log["last_epoch_loss"] < log["first_loss"]
    drift = repaired_drift(config, reference, cset, out)  # on its training texts: must improve
    assert drift["after"]["mean_drift"] < drift["before"]["mean_drift"]


def test_repair_config_is_checked():
    with pytest.raises(ValueError, match="loss='l1' is not valid; expected one of: cosine, mse"):
        RepairConfig(loss="l1")


def test_encode_cli_applies_an_adapter(tmp_path, tiny_model_dir, tiny_adapters, cli_main):
    def run(*extra):
        out = tmp_path / f"out{len(extra)}.npy"
        rc, _, err = cli_main("encode", "--input", DATA / "sample_docs.txt", "--output", out, "--model",
                              tiny_model_dir, "--quant", "nf4", "--quiet", *extra)
        assert rc == 0, err
        return np.load(out), err

    base, _ = run()
    adapted, log = run("--adapter", tiny_adapters["A"])
    assert "adapter " in log and "rank 4" in log
    assert (base * adapted).sum(axis=1).max() < 0.999


@pytest.mark.slow
def test_repair_cuts_nf4_heldout_drift_by_a_third_on_the_real_model(tmp_path, real_model_dir):
    cset = load_calibration_set()
    tune, heldout = cset.select("tune", max_chars=600), cset.select("heldout", max_chars=600)
    reference = make_reference(tmp_path, real_model_dir, cset.select("all", max_chars=600), max_length=512)
    config = RuntimeConfig(model=str(real_model_dir), quant="nf4")
    train_repair_adapter(config, reference, tune, RepairConfig(), tmp_path / "repair", progress=False)
    drift = repaired_drift(config, reference, heldout, tmp_path / "repair")
    assert drift["drift_reduction"] >= 1 / 3, json.dumps(drift, indent=1)
