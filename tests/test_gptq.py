"""gptq4: real gptqmodel layers calibrated on the tuning split, exact bytes, and adapters on top (extra [gptq])."""

import importlib.util
import logging
import os

import numpy as np
import pytest

# find_spec, not import: gptqmodel's import changes HF_HOME and logging for the whole process (runtime/gptq undoes it)
if importlib.util.find_spec("gptqmodel") is None:
    pytest.skip("the [gptq] extra is not installed: pip install 'lowmem-e5[gptq]'", allow_module_level=True)

from transformers import AutoConfig  # noqa: E402

from lowmem_e5 import Embedder, RuntimeConfig, load_model  # noqa: E402
from lowmem_e5.quality.planner import meta_model, plan_weights  # noqa: E402
from lowmem_e5.runtime.adapters import AdapterError  # noqa: E402
from lowmem_e5.runtime.gptq import calibration_rows  # noqa: E402
from lowmem_e5.runtime.memory import quantized_linear_count  # noqa: E402
from lowmem_e5.runtime.pooling import rowwise_cosine  # noqa: E402

from .conftest import MIXED_TEXTS, fill_batches  # noqa: E402

TEXTS = MIXED_TEXTS[:5]


@pytest.fixture(scope="module")
def gptq_tiny(tiny_model_dir):
    env, level = dict(os.environ), logging.getLogger().level
    embedder = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="gptq4", group_size=32,
                                                 max_length=256)))
    assert dict(os.environ) == env and logging.getLogger().level == level, "loading gptq4 changed the environment or logging"
    return embedder


def test_a_group_size_that_does_not_divide_the_widths_is_refused_before_quantising(tiny_model_dir, real_model_dir):
    from lowmem_e5.errors import ModelSourceError
    from lowmem_e5.runtime.gptq import group_size_problem

    with pytest.raises(ModelSourceError, match=r"group_size=128 does not divide this model's hidden_size 64, "
                                               r"attention width \(heads x head_dim\) 64; .*use --group-size 64"):
        load_model(RuntimeConfig(model=str(tiny_model_dir), quant="gptq4", group_size=128))
    small = AutoConfig.from_pretrained(real_model_dir)  # hidden 576 = 4.5 x 128
    assert "hidden_size 576" in group_size_problem(small, 128) and group_size_problem(small, 64) is None


def test_calibration_rows_are_the_tuning_split_as_the_model_reads_it(tiny_embedder):
    from lowmem_e5.runtime.calibration_set import load_calibration_set

    tune = load_calibration_set().select("tune")
    rows = calibration_rows(tiny_embedder.loaded.tokenizer)
    assert len(rows) == len(tune.rows)
    expected = tiny_embedder.tokenize(tune.model_texts()[:3])
    for row, ids in zip(rows, expected.rows):
        assert row["input_ids"] == [list(ids)] and row["attention_mask"] == [[1] * len(ids)]
        assert ids[0] == tiny_embedder.loaded.tokenizer.bos_token_id and ids[-1] == 2  # BOS ... EOS


def test_gptq4_uses_gptqmodel_layers_with_exact_bytes_and_close_vectors(gptq_tiny, tiny_model_dir, tiny_embedder):
    counts = quantized_linear_count(gptq_tiny.model)
    assert sum(counts.values()) == 14 and all(not name.startswith("Linear") for name in counts)  # 7 per layer
    planned = plan_weights(meta_model(AutoConfig.from_pretrained(tiny_model_dir)), "gptq4", False, "float32",
                           group_size=32)
    assert planned.total == gptq_tiny.loaded.weight_bytes.total
    assert gptq_tiny.loaded.weight_bytes.quantized == 36_864  # 73,728 weights, 4 bits each
    quantized, _ = gptq_tiny.encode(TEXTS)
    full, _ = tiny_embedder.encode(TEXTS)
    cos = rowwise_cosine(quantized, full)
    assert 0.95 < cos.min() and cos.max() < 1.0 - 1e-6  # close, and really quantised


def test_adapters_on_a_gptq_base_switch_and_batch_per_row(gptq_tiny, tiny_adapters):
    e = gptq_tiny
    base = e.encode(TEXTS)[0]
    for name in ("A", "B"):
        e.load_adapter(name, tiny_adapters[name])
    a, b = e.encode(TEXTS, adapter="A")[0], e.encode(TEXTS, adapter="B")[0]
    assert rowwise_cosine(a, base).max() < 0.999 and rowwise_cosine(a, b).max() < 0.999
    assert np.array_equal(e.encode(TEXTS)[0], base)
    choice = ["A", None, "B", "A", None]
    alone = np.stack([e.encode([t], adapter=c)[0][0] for t, c in zip(TEXTS, choice)])
    plan = e.plan
    e.plan = fill_batches
    try:
        mixed, stats = e.encode(TEXTS, adapter=choice)
    finally:
        e.plan = plan
    # peft's GPTQ LoRA layer cannot route rows: one batch per adapter, each row still gets its own adapter's vector
    assert not e.routes_rows_to_adapters and stats.n_batches == 3 and stats.n_texts == 5
    assert rowwise_cosine(mixed, alone).min() >= 0.9999
    with pytest.raises(AdapterError, match="cannot be merged into a quantised base"):
        e.adapters.merge("A")


def test_repair_trains_through_gptq_layers(tmp_path, tiny_model_dir):
    """LoRA gradients flow through gptqmodel's layers (non-zero in every layer), and repair pulls towards the
    reference as on bitsandbytes bases."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lowmem_e5.quality.repair import RepairConfig, repaired_drift, train_repair_adapter
    from lowmem_e5.runtime.calibration_set import load_calibration_set

    from .test_repair import make_reference

    config = RuntimeConfig(model=str(tiny_model_dir), quant="gptq4", group_size=32)
    model = get_peft_model(load_model(config).model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = torch.tensor([[1, 400, 500, 600, 2]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1].sum().backward()
    grads = [p.grad.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n]  # A: 0 while B is 0
    assert len(grads) == 4 and min(grads) > 0

    cset = load_calibration_set().select("tune", max_chars=200)
    reference = make_reference(tmp_path, tiny_model_dir, cset)
    out = tmp_path / "repair"
    log = train_repair_adapter(config, reference, cset, RepairConfig(rank=4, epochs=4, batch_size=8, lr=2e-3), out,
                               progress=False)
    assert log["last_epoch_loss"] < log["first_loss"]
    drift = repaired_drift(config, reference, cset, out)
    assert drift["after"]["mean_drift"] < drift["before"]["mean_drift"]


def test_peft_imports_gptqmodel_only_for_gptq_models_and_the_environment_stays(tiny_model_dir, tiny_adapters):
    """peft imports gptqmodel whenever it builds LoRA layers if it is installed, and that import repoints HF_HOME,
    lowers the root logger and prints a banner: an adapter on a bitsandbytes or fp32 base must not import it at all,
    and where a GPTQ model needs it (runtime.gptq) the process is left as it was and nothing reaches the terminal."""
    import subprocess
    import sys

    code = f"""
import logging, os, sys
from lowmem_e5 import Embedder, RuntimeConfig, load_model
e = Embedder(load_model(RuntimeConfig(model={str(tiny_model_dir)!r}, quant="fp32", max_length=64)))
env, level = dict(os.environ), logging.getLogger().level
e.load_adapter("A", {str(tiny_adapters["A"])!r})
assert "gptqmodel" not in sys.modules, "peft imported gptqmodel for an fp32 base"
from lowmem_e5.runtime.gptq import require_gptq
require_gptq()
assert "gptqmodel" in sys.modules
e.load_adapter("B", {str(tiny_adapters["B"])!r})
changed = {{k: os.environ.get(k) for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}}
assert not changed and logging.getLogger().level == level, (changed, logging.getLogger().level)
print("unchanged")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "unchanged", r.stdout[-2000:] + r.stderr[-2000:]
    assert "GPT-QModel" not in r.stderr and "INFO" not in r.stderr, r.stderr[-2000:]
