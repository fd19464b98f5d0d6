"""The GPU check is kept runnable: its shell wrapper parses and its measuring script runs on a tiny config on CPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")]).returncode == 0


def run_gpu_check(tmp_path, gptq_layers: int) -> dict:
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--tiny", "--device", "cpu",
                        "--folder", str(tmp_path / "e5-tiny"), "--budgets", "1024", "--repeats", "1",
                        "--serve-seconds", "1", "--serve-clients", "4", "--gptq-layers", str(gptq_layers),
                        "--gptq-group-size", "32",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_gpu_check_measures_every_mode_on_the_tiny_folder_with_the_planner_exact(tmp_path):
    result = run_gpu_check(tmp_path, gptq_layers=0)
    assert result["run"]["folder"] == str(tmp_path / "e5-tiny") and result["gptq4"] is None
    assert [m["mode"] for m in result["modes"]] == ["fp16", "int8", "nf4", "nf4+dq"]
    for m in result["modes"]:
        if m["mode"] != "fp16":  # the planner is asked for the CPU's float32 unquantised parts; fp16 keeps 16-bit
            assert m["weight_bytes"] == m["planned_weight_bytes"], m
        assert m["tokens_per_second"]["1024"] > 0
        assert m["prefix_cache"]["cosine_min"] >= 0.999 and m["prefix_cache"]["speedup"] > 0
    server = next(m for m in result["modes"] if m["mode"] == "nf4")["server"]  # the real server around the model
    for label in ("batched", "one_at_a_time"):
        assert server[label]["queries_texts_per_s"] > 0 and server[label]["documents_texts_per_s"] > 0


@pytest.mark.slow  # GPTQ's calibration pass; gptq4's fast test is test_gptq.py's quantise-at-load
def test_gpu_check_quantises_full_size_layers_with_gptq_beside_nf4(tmp_path):
    gptq = run_gpu_check(tmp_path, gptq_layers=2)["gptq4"]  # GPTQ layers of the config's shapes beside nf4
    if importlib.util.find_spec("gptqmodel") is None:
        assert "error" in gptq
        return
    assert "error" not in gptq, gptq.get("error")
    for mode, layer_type in (("gptq4", "TorchAtenLinear"), ("nf4", "Linear4bit")):
        assert gptq[mode]["weight_bytes"] == gptq[mode]["planned_weight_bytes"], gptq
        assert gptq[mode]["layers_by_type"] == {layer_type: 14} and gptq[mode]["tokens_per_second"]["1024"] > 0
    assert gptq["gptq4"]["weight_bytes"] != gptq["nf4"]["weight_bytes"]
