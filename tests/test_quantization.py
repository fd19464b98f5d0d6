"""Every quantised mode loads the real small model through real bitsandbytes layers, with exact byte counts."""

import math

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.runtime.memory import quantized_linear_count
from lowmem_e5.runtime.pooling import rowwise_cosine

from .conftest import MIXED_TEXTS, fill_batches

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def linear_shapes(model) -> list[tuple[int, int]]:
    return [tuple(m.weight.shape) if not hasattr(m.weight, "quant_state") else tuple(m.weight.quant_state.shape)
            for m in model.modules() if isinstance(m, torch.nn.Linear)]


def expected_bytes(mode: str, double_quant: bool, shapes, other_params: int, other_bytes_per_param: int) -> int:
    """Bytes as bitsandbytes stores them, from the layer shapes alone."""
    full = other_params * other_bytes_per_param
    total = full
    for out_f, in_f in shapes:
        n = out_f * in_f
        if mode == "int8":
            total += n + out_f * 4  # int8 weights + one fp32 scale per output row
        else:
            blocks = math.ceil(n / 64)
            total += n // 2 + 16 * 4  # two 4-bit codes per byte + the 16-entry fp32 codebook
            if double_quant:
                total += blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4  # uint8 absmax, nested fp32 absmax, codebook, offset
            else:
                total += blocks * 4  # fp32 absmax per 64-weight block
    return total


@pytest.fixture(scope="module")
def fp16_bytes(real_model_dir) -> int:
    return load_model(RuntimeConfig(model=str(real_model_dir), quant="fp16")).weight_bytes.total


@pytest.fixture(scope="module")
def reference(real_fp32):
    return real_fp32.encode(MIXED_TEXTS)[0]


@pytest.mark.parametrize("mode, double_quant, layer_cls", [
    ("int8", False, bnb.nn.Linear8bitLt),
    ("nf4", False, bnb.nn.Linear4bit),
    ("nf4", True, bnb.nn.Linear4bit),
    ("fp4", False, bnb.nn.Linear4bit),
    ("fp4", True, bnb.nn.Linear4bit),
])
def test_quantised_modes_use_bitsandbytes_layers_and_fewer_bytes(real_model_dir, real_fp32, fp16_bytes, reference,
                                                                   mode, double_quant, layer_cls):
    loaded = load_model(RuntimeConfig(model=str(real_model_dir), quant=mode, double_quant=double_quant))
    n_layers = loaded.model.config.num_hidden_layers
    assert quantized_linear_count(loaded.model) == {layer_cls.__name__: LINEARS_PER_LAYER * n_layers}
    first = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(first, layer_cls)
    assert first.weight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    if mode != "int8":
        assert first.weight.quant_state.quant_type == mode
        assert first.weight.quant_state.nested == double_quant

    shapes = linear_shapes(real_fp32.loaded.model)
    other = sum(p.numel() for p in real_fp32.loaded.model.parameters()) - sum(o * i for o, i in shapes)
    assert loaded.weight_bytes.total == expected_bytes(mode, double_quant, shapes, other, 4)  # fp32 rest on CPU
    assert loaded.weight_bytes.total < fp16_bytes

    vectors = Embedder(loaded).encode(MIXED_TEXTS)[0]
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    cos = rowwise_cosine(vectors, reference)
    assert cos.mean() > 0.7  # sanity only: the per-mode drift thresholds are measured on the calibration set
    assert cos.min() < 0.99999  # and the vectors did go through quantised weights


def test_double_quant_saves_bytes_over_plain_nf4(real_model_dir):
    plain = load_model(RuntimeConfig(model=str(real_model_dir), quant="nf4")).weight_bytes
    double = load_model(RuntimeConfig(model=str(real_model_dir), quant="nf4", double_quant=True)).weight_bytes
    assert double.quantized == plain.quantized and double.constants < plain.constants / 3


@pytest.mark.parametrize("mode, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_modes_hold_half_the_fp32_bytes(real_model_dir, real_fp32, reference, mode, dtype):
    loaded = load_model(RuntimeConfig(model=str(real_model_dir), quant=mode, max_length=512))
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == dtype
    assert loaded.weight_bytes.total * 2 == real_fp32.loaded.weight_bytes.total
    vectors = Embedder(loaded).encode(MIXED_TEXTS[:3])[0]
    assert rowwise_cosine(vectors, reference[:3]).min() > 0.98


def test_int8_outlier_threshold_sets_batch_dependence(real_model_dir):
    """LLM.int8() picks outlier columns over the whole batch: with threshold 0 a text's vector no longer depends
    on what it is batched with; the default threshold reaches the layers too."""
    default = load_model(RuntimeConfig(model=str(real_model_dir), quant="int8", max_length=512))
    assert {m.state.threshold for m in default.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)} == {6.0}
    e = Embedder(load_model(RuntimeConfig(model=str(real_model_dir), quant="int8", int8_threshold=0.0,
                                          max_length=512)))
    layers = [m for m in e.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(m.state.threshold == 0.0 for m in layers)
    e.plan = fill_batches
    batched, stats = e.encode(MIXED_TEXTS)
    assert stats.n_batches == 1 and stats.padded_tokens > stats.real_tokens
    alone = np.concatenate([e.encode([t])[0] for t in MIXED_TEXTS])
    assert rowwise_cosine(alone, batched).min() >= 0.9999
