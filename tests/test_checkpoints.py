"""Pre-quantised checkpoints: `quantize` -> load gives the same vectors bit for bit, and bad folders are refused."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.errors import ModelSourceError, OutputError
from lowmem_e5.runtime.checkpoints import CHECKPOINT_FILE, save_quantized
from lowmem_e5.runtime.fingerprint import model_fingerprint, same_model
from lowmem_e5.runtime.pooling import rowwise_cosine

from .conftest import MIXED_TEXTS

TEXTS = MIXED_TEXTS[:4]
# slow: GPTQ's calibration pass (23 s); gptq4's fast test is test_gptq.py's quantise-at-load
GPTQ = pytest.param("gptq4", marks=[pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                                       reason="the [gptq] extra is not installed"), pytest.mark.slow])


def quantize(model_dir, out, quant, **kw):
    loaded = load_model(RuntimeConfig(model=str(model_dir), quant=quant, max_length=256, **kw))
    save_quantized(loaded, out, model_fingerprint(str(model_dir)))
    return Embedder(loaded)


@pytest.mark.parametrize("quant", ["nf4", "int8", GPTQ])
def test_a_saved_checkpoint_loads_to_the_same_vectors_and_bytes(tmp_path, tiny_model_dir, quant):
    kw = {"group_size": 32} if quant == "gptq4" else {}
    original = quantize(tiny_model_dir, tmp_path / "ck", quant, **kw)
    reloaded = Embedder(load_model(RuntimeConfig(model=str(tmp_path / "ck"), quant=quant, max_length=256, **kw)))
    assert np.array_equal(original.encode(TEXTS)[0], reloaded.encode(TEXTS)[0])
    assert reloaded.loaded.weight_bytes == original.loaded.weight_bytes
    fingerprint = model_fingerprint(str(tmp_path / "ck"))
    assert same_model(model_fingerprint(str(tiny_model_dir)), fingerprint) == []  # the source's references apply
    assert fingerprint["checkpoint"]["quant"] == quant
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_4bit_checkpoint_made_in_float32_computes_in_the_runtime_dtype(tmp_path, tiny_model_dir):
    """Quantised on a CPU (float32), loaded where the runtime computes in another dtype (float16 on a GPU; bfloat16
    here): the runtime's dtype wins, as when quantising at load, not the one stored in the checkpoint."""
    from bitsandbytes.nn import Linear4bit

    quantize(tiny_model_dir, tmp_path / "ck", "nf4")
    at_load = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="nf4", compute_dtype="bfloat16",
                                                max_length=256)))
    saved = Embedder(load_model(RuntimeConfig(model=str(tmp_path / "ck"), quant="nf4", compute_dtype="bfloat16",
                                              max_length=256)))
    layers = [m for m in saved.model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    assert {(m.compute_dtype, m.weight.quant_state.dtype) for m in layers} == {(torch.bfloat16, torch.bfloat16)}
    assert saved.model.embed_tokens.weight.dtype == torch.bfloat16
    a, b = at_load.encode(TEXTS)[0], saved.encode(TEXTS)[0]
    assert rowwise_cosine(a, b).min() > 0.99  # same weights up to bf16 rounding of the scales' source


def test_bad_checkpoint_folders_are_refused_with_the_reason(tmp_path, tiny_model_dir, real_model_dir):
    quantize(tiny_model_dir, tmp_path / "ck", "nf4")
    with pytest.raises(ModelSourceError, match=r"pre-quantised nf4 checkpoint; quant='int8' \(stored: 'nf4'\) "
                                               r"contradicts it: load it with --quant nf4"):
        load_model(RuntimeConfig(model=str(tmp_path / "ck"), quant="int8"))
    with pytest.raises(ModelSourceError, match=r"double_quant=True \(stored: False\)"):
        load_model(RuntimeConfig(model=str(tmp_path / "ck"), quant="nf4", double_quant=True))
    quantize(tiny_model_dir, tmp_path / "ck8", "int8")
    with pytest.raises(ModelSourceError, match=r"int8 checkpoint saved with int8_threshold=6.0; int8_threshold=0.0"):
        load_model(RuntimeConfig(model=str(tmp_path / "ck8"), quant="int8", int8_threshold=0.0))
    weights = tmp_path / "ck" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match=r"'model.safetensors' does not match its sha256 .*corrupted"):
        load_model(RuntimeConfig(model=str(tmp_path / "ck"), quant="nf4"))
    weights.unlink()
    with pytest.raises(ModelSourceError, match=r"'model.safetensors' is missing; the checkpoint is incomplete"):
        load_model(RuntimeConfig(model=str(tmp_path / "ck"), quant="nf4"))
    # another model's checkpoint: its fingerprint is not the real model's, so the real model's references refuse it
    assert same_model(model_fingerprint(str(real_model_dir)), model_fingerprint(str(tmp_path / "ck")))


def test_quantize_never_leaves_a_half_folder(tmp_path, tiny_model_dir, monkeypatch):
    loaded = load_model(RuntimeConfig(model=str(tiny_model_dir), quant="nf4"))
    with pytest.raises(OutputError, match="exists; expected a new folder name"):
        save_quantized(loaded, tmp_path, {})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(loaded, tmp_path / "ck", {})
    assert list(tmp_path.iterdir()) == []


def test_quantize_command(tmp_path, tiny_model_dir, cli_main):
    args = ["quantize", "--model", tiny_model_dir, "--quant", "nf4", "--output", tmp_path / "ck"]
    rc, out, err = cli_main(*args)
    assert rc == 0, err
    summary = json.loads(out)
    record = json.loads((tmp_path / "ck" / CHECKPOINT_FILE).read_text())
    assert summary["weight_bytes"] == record["weight_bytes"]["total"] and summary["disk_bytes"] > 0
    assert record["quantization"] == {"quant": "nf4", "double_quant": False, "group_size": 128}
    rc, out, err = cli_main(*args)
    assert rc == 2 and "exists; expected a new folder name" in err
    rc, out, err = cli_main(*args[:-4], "--quant", "fp32", "--output", tmp_path / "x")
    assert rc == 2 and "--quant fp32 is not a quantised mode" in err
