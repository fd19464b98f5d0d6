"""The planner counts bytes on the meta device; they must equal what a loaded model really holds."""

import pytest
from transformers import AutoConfig

from lowmem_e5 import RuntimeConfig, load_model
from lowmem_e5.quality.planner import e5_mistral_config, max_token_budget, meta_model, plan_table, plan_weights


@pytest.fixture(scope="module")
def small_meta(real_model_dir):
    return meta_model(AutoConfig.from_pretrained(real_model_dir))


@pytest.mark.parametrize("quant, double_quant, overrides", [
    ("fp32", False, ()), ("fp16", False, ()), ("bf16", False, ()), ("int8", False, ()), ("nf4", False, ()),
    ("nf4", True, ()), ("fp4", False, ()), ("fp4", True, ()),
    ("nf4", False, ("layers.0.mlp.down_proj=int8", "layers.3.self_attn.k_proj=full", "embed_tokens=int8")),
    ("nf4", True, ("embed_tokens=nf4",)),
    ("int8", False, ("layers.29.mlp.up_proj=full", "embed_tokens=int8")),
])
def test_planned_bytes_equal_the_loaded_footprint_exactly(real_model_dir, small_meta, quant, double_quant, overrides):
    config = RuntimeConfig(model=str(real_model_dir), quant=quant, double_quant=double_quant, overrides=overrides)
    loaded = load_model(config)
    planned = plan_weights(small_meta, quant, double_quant, config.resolved_compute_dtype(), config.override_map())
    assert planned.total == loaded.weight_bytes.total


def test_e5_mistral_architecture_on_meta():
    model = meta_model(e5_mistral_config())
    assert sum(p.numel() for p in model.parameters()) == 7_110_660_096  # the published parameter count
    fp16 = plan_weights(model, "fp16")
    assert fp16.total == 2 * 7_110_660_096
    nf4 = plan_weights(model, "nf4")
    assert nf4.other == 32000 * 4096 * 2 + (2 * 32 + 1) * 4096 * 2  # 16-bit token embedding and norms


def test_plan_table_fits_nf4_on_6_gib_and_fp16_only_on_16():
    rows = {r["mode"]: r for r in plan_table(e5_mistral_config())}
    assert rows["nf4"]["max_token_budget"]["6GiB"] > 4096
    assert rows["int8"]["max_token_budget"]["6GiB"] == 0 and rows["int8"]["max_token_budget"]["8GiB"] > 4096
    assert rows["fp16"]["max_token_budget"]["12GiB"] == 0 and rows["fp16"]["max_token_budget"]["16GiB"] > 0
    w = plan_weights(meta_model(e5_mistral_config()), "nf4")
    assert max_token_budget(int(w.total), w, e5_mistral_config(), "float16") == 0


def test_replicas_per_gpu_follow_the_planner_bytes():
    from lowmem_e5.errors import LowmemError
    from lowmem_e5.jobs.distributed import replicas_per_gpu
    from lowmem_e5.quality.planner import (
        activation_bytes_per_token,
        e5_mistral_config,
        meta_model,
        plan_weights,
        replica_bytes,
        replicas_table,
    )

    config = e5_mistral_config()
    rows = {r["mode"]: r for r in replicas_table(config, {"24GiB": 24 << 30, "80GiB": 80 << 30}, 16384)}
    nf4 = plan_weights(meta_model(config), "nf4", False, "float16")
    need = replica_bytes(nf4, config, "float16", 16384)
    assert rows["nf4"]["replica_bytes"] == need
    assert need == nf4.total + nf4.largest_linear * 2 + (768 << 20) + 16384 * activation_bytes_per_token(config, "float16")
    assert rows["nf4"]["replicas"] == {"24GiB": replicas_per_gpu(24 << 30, need), "80GiB": (80 << 30) // need}
    assert rows["nf4"]["replicas"]["24GiB"] == 3 and rows["fp16"]["replicas"]["24GiB"] == 1
    with pytest.raises(LowmemError, match=r"one replica needs 6.32 GiB .* GPUs have 4.00 GiB; lower --token-budget"):
        replicas_per_gpu(4 << 30, need)
