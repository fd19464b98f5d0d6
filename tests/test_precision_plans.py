"""Mixed precision plans: per-module overrides load as the asked bitsandbytes layers; scan and grid work end to end."""

import json

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.quality.compare import GridEntry, markdown_table, pareto_front, plot, run_grid
from lowmem_e5.quality.precision_plans import greedy_plans, linear_sensitivity
from lowmem_e5.quality.reference import embed_calibration, read_reference, write_reference
from lowmem_e5.runtime.calibration_set import load_calibration_set
from lowmem_e5.runtime.tokenization import pad_rows


@pytest.mark.parametrize("entry, message", [
    ("layers.0.mlp.down_proj", "expected 'module.name=format'"),
    ("layers.0.mlp.down_proj=nf4", "expected one of: full, int8"),
    ("embed_tokens=full", "expected one of: int8, nf4"),
])
def test_bad_overrides_are_named(entry, message):
    with pytest.raises(ValueError, match=message):
        RuntimeConfig(quant="nf4", overrides=(entry,))


def test_overrides_need_a_quantised_base_and_round_trip_json():
    with pytest.raises(ValueError, match="overrides are not valid with quant='fp16'"):
        RuntimeConfig(quant="fp16", overrides=("embed_tokens=int8",))
    c = RuntimeConfig(quant="nf4", overrides=("embed_tokens=int8", "layers.1.mlp.up_proj=full"))
    assert RuntimeConfig.from_json(c.to_json()) == c


def test_override_modules_load_as_asked(tiny_model_dir):
    config = RuntimeConfig(model=str(tiny_model_dir), quant="nf4",
                           overrides=("layers.0.mlp.down_proj=int8", "layers.1.self_attn.v_proj=full",
                                      "embed_tokens=int8"))
    loaded = load_model(config)
    m = loaded.model
    assert isinstance(m.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert type(m.layers[1].self_attn.v_proj) is torch.nn.Linear
    assert isinstance(m.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert isinstance(m.embed_tokens.inner, bnb.nn.Embedding8bit)
    vectors = Embedder(loaded).encode(["hello there", "general kenobi"])[0]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_unknown_override_module_lists_real_names(tiny_model_dir):
    with pytest.raises(ValueError, match="override module 'layers.9.mlp.down_proj' is not in the model; expected names like"):
        load_model(RuntimeConfig(model=str(tiny_model_dir), quant="nf4", overrides=("layers.9.mlp.down_proj=int8",)))


def test_sensitivity_scan_ranks_every_linear_and_plans_respect_their_share(tiny_embedder):
    tok = tiny_embedder.tokenize(["a few words here", "def f(x):\n    return x * 2", "Le chat dort."])
    ids, mask, pos = pad_rows(tok.rows, 2, "right")
    sens = linear_sensitivity(tiny_embedder.loaded.model, [{"input_ids": ids, "attention_mask": mask,
                                                            "position_ids": pos}])
    assert len(sens) == 14 and all(0 < s.relative_error < 1 for s in sens)
    assert [s.relative_error for s in sens] == sorted((s.relative_error for s in sens), reverse=True)
    total = sum(s.weights for s in sens)
    weights = {s.name: s.weights for s in sens}
    for frac, plan in zip((0.1, 0.5), greedy_plans(sens, (0.1, 0.5))):
        assert sum(weights[e.split("=")[0]] for e in plan) <= frac * total
        assert all(e.endswith("=int8") for e in plan)


def test_pareto_front():
    points = [(1, 5), (2, 2), (3, 3), (4, 1), (5, 1)]
    assert pareto_front(points) == [0, 1, 3]


def test_compare_grid_writes_one_json_per_run_a_table_and_a_png_and_resumes(tmp_path, tiny_model_dir):
    cset = load_calibration_set().select("heldout", max_chars=200)
    base = RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=256)
    fp32 = Embedder(load_model(base))
    write_reference(tmp_path / "ref.safetensors", embed_calibration(fp32, cset), cset, str(tiny_model_dir), "fp32", 256)
    reference = read_reference(tmp_path / "ref.safetensors")
    entries = [GridEntry("fp32", "fp32"), GridEntry("int8", "int8"), GridEntry("nf4", "nf4"),
               GridEntry("nf4:emb-int8", "nf4", False, ("embed_tokens=int8",), "nf4, embedding int8")]
    out = tmp_path / "grid"
    records, _ = run_grid(entries, base, reference, cset, out, log=lambda m: None)
    assert sorted(p.name for p in out.glob("*.json")) == ["fp32.json", "int8.json", "nf4-emb-int8.json", "nf4.json"]
    by = {r["run"]["label"]: r for r in records}
    assert by["fp32"]["quality"]["mean_cosine"] > 0.9999
    assert by["nf4:emb-int8"]["memory"]["weight_bytes"]["total"] < by["nf4"]["memory"]["weight_bytes"]["total"]
    table = markdown_table(records)
    assert table.count("\n") == 1 + len(entries) and "| nf4:emb-int8 |" in table
    plot(records, out / "plot.png", "test")
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = []
    again, _ = run_grid(entries, base, reference, cset, out, log=logged.append)
    assert all("kept" in line for line in logged), logged
    assert json.dumps(again, sort_keys=True) == json.dumps(json.loads(json.dumps(records)), sort_keys=True)
    # a result file of another model (here: its fingerprint edited) or of other settings is redone, saying why
    stale = json.loads((out / "nf4.json").read_text())
    stale["run"]["model_fingerprint"]["weights_sha256"] = "0" * 64
    (out / "nf4.json").write_text(json.dumps(stale))
    logged = []
    run_grid(entries[2:3], base, reference, cset, out, log=logged.append)
    assert logged[0] == "[1/1] nf4: nf4.json redone: it was made from another model", logged
    redone = json.loads((out / "nf4.json").read_text())
    assert redone["run"]["model_fingerprint"] == records[0]["run"]["model_fingerprint"]
    logged = []
    run_grid(entries[1:2], base.replace(int8_threshold=0.0), reference, cset, out, log=logged.append)
    assert logged[0] == "[1/1] int8: int8.json redone: it was made with other settings", logged
