"""LoRA adapters on one base: they really change the output, switch without leaking, and batch per row."""

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.runtime.adapters import AdapterError
from lowmem_e5.runtime.memory import weight_bytes
from lowmem_e5.runtime.pooling import rowwise_cosine

from .conftest import MIXED_TEXTS, fill_batches, train_test_adapter

TEXTS = MIXED_TEXTS[:5]


def embedder_for(model_dir, quant="fp32"):
    return Embedder(load_model(RuntimeConfig(model=str(model_dir), quant=quant, max_length=256)))


def file_tensor_bytes(folder) -> int:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


@pytest.mark.parametrize("quant", ["fp32", "int8", "nf4"])
def test_adapters_change_output_switch_back_bit_for_bit_and_deactivate_to_base(tiny_model_dir, tiny_adapters, quant):
    e = embedder_for(tiny_model_dir, quant)
    base = e.encode(TEXTS)[0]
    base_bytes = weight_bytes(e.model).total
    infos = [e.load_adapter(name, folder) for name, folder in tiny_adapters.items()]
    assert e.adapters.names == ["A", "B", "C"]
    # memory grows by exactly the adapters' weights, as stored in their files
    assert weight_bytes(e.model).total - base_bytes == sum(i.bytes for i in infos)
    assert [i.bytes for i in infos] == [file_tensor_bytes(f) for f in tiny_adapters.values()]
    assert np.array_equal(e.encode(TEXTS)[0], base)  # loading does not activate
    a = e.encode(TEXTS, adapter="A")[0]
    b = e.encode(TEXTS, adapter="B")[0]
    c = e.encode(TEXTS, adapter="C")[0]
    for other in (a, b, c):
        assert rowwise_cosine(other, base).max() < 0.999  # an adapter that returned base vectors fails here
    assert rowwise_cosine(a, b).max() < 0.999
    assert np.array_equal(e.encode(TEXTS, adapter="A")[0], a)  # A -> B -> C -> A: A's vectors again, bit for bit
    assert np.array_equal(e.encode(TEXTS)[0], base)  # no adapter: base, bit for bit
    assert np.array_equal(e.encode(TEXTS, adapter="B")[0], b)


@pytest.mark.parametrize("quant", ["fp32", "nf4"])
def test_a_mixed_batch_gives_each_row_its_adapters_vector(tiny_model_dir, tiny_adapters, quant):
    e = embedder_for(tiny_model_dir, quant)
    for name in ("A", "B"):
        e.load_adapter(name, tiny_adapters[name])
    choice = ["A", None, "B", "A", None]
    alone = np.stack([e.encode([t], adapter=c)[0][0] for t, c in zip(TEXTS, choice)])
    e.plan = fill_batches
    mixed, stats = e.encode(TEXTS, adapter=choice)
    assert stats.n_batches == 1
    assert rowwise_cosine(mixed, alone).min() >= 0.9999
    assert np.array_equal(e.encode(TEXTS)[0], e.encode(TEXTS, adapter=[None] * 5)[0])


def test_delete_and_unknown_names(tiny_model_dir, tiny_adapters):
    e = embedder_for(tiny_model_dir)
    base = e.encode(TEXTS)[0]
    e.load_adapter("A", tiny_adapters["A"])
    e.load_adapter("B", tiny_adapters["B"])
    with pytest.raises(AdapterError, match="adapter 'Z' is not loaded; loaded adapters: A, B"):
        e.encode(TEXTS, adapter="Z")
    with pytest.raises(AdapterError, match="already loaded"):
        e.load_adapter("A", tiny_adapters["A"])
    e.adapters.delete("A")
    assert e.adapters.names == ["B"]
    with pytest.raises(AdapterError, match="loaded adapters: B"):
        e.encode(TEXTS, adapter="A")
    assert np.array_equal(e.encode(TEXTS)[0], base)


@pytest.mark.parametrize("quant", ["fp32", "nf4"])
def test_deleting_the_last_adapter_leaves_the_base_bit_for_bit(tiny_model_dir, tiny_adapters, quant):
    """peft keeps a deleted last adapter active and its next forward fails: the set unwraps to the bare base."""
    e = embedder_for(tiny_model_dir, quant)
    base, bytes_before = e.encode(TEXTS)[0], weight_bytes(e.model).total
    e.load_adapter("A", tiny_adapters["A"])
    with_a = e.encode(TEXTS, adapter="A")[0]
    e.adapters.delete("A")
    assert e.adapters.names == [] and np.array_equal(e.encode(TEXTS)[0], base)
    assert weight_bytes(e.model).total == bytes_before
    e.load_adapter("A", tiny_adapters["A"])  # loads again on the unwrapped base
    assert np.array_equal(e.encode(TEXTS, adapter="A")[0], with_a)


def test_bad_adapter_folders_are_refused_with_the_reason(tmp_path, tiny_model_dir, tiny_adapters, real_model_dir):
    e = embedder_for(tiny_model_dir)
    with pytest.raises(AdapterError, match="adapter folder .*nowhere' does not exist"):
        e.load_adapter("x", tmp_path / "nowhere")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_adapters["A"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="no adapter_model.safetensors .*pickled .bin weights are refused"):
        e.load_adapter("x", pickled)
    no_config = tmp_path / "noconfig"
    shutil.copytree(tiny_adapters["A"], no_config)
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        e.load_adapter("x", no_config)
    wrong_target = tmp_path / "target"
    shutil.copytree(tiny_adapters["A"], wrong_target)
    cfg = json.loads((wrong_target / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn"]
    (wrong_target / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"targets \['c_attn'\], which the base model lacks"):
        e.load_adapter("x", wrong_target)
    other_base = train_test_adapter(real_model_dir, tmp_path / "real", seed=0, steps=1)
    with pytest.raises(AdapterError, match="was made for another base: .* has shape"):
        e.load_adapter("x", other_base)
    assert e.adapters.names == []


def test_merge_only_on_full_precision_with_its_drift_measured(tiny_model_dir, tiny_adapters):
    quantized = embedder_for(tiny_model_dir, "nf4")
    quantized.load_adapter("A", tiny_adapters["A"])
    with pytest.raises(AdapterError, match="cannot be merged into a quantised base"):
        quantized.adapters.merge("A")
    e = embedder_for(tiny_model_dir)
    e.load_adapter("A", tiny_adapters["A"])
    unmerged = e.encode(TEXTS, adapter="A")[0]
    e.adapters.merge("A")
    merged = e.encode(TEXTS)[0]
    assert e.adapters.names == []
    assert rowwise_cosine(merged, unmerged).min() >= 0.9999  # merge drift on fp32: below 1e-4
