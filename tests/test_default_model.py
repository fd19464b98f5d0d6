"""The embedded default model: a Llama-architecture checkpoint copied exactly into E5's MistralModel."""

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaModel, MistralModel

from lowmem_e5.default_model import GGUF_SHA256, mistral_config_like


def test_llama_weights_copied_into_mistral_give_identical_outputs():
    torch.manual_seed(0)
    llama_config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=1024, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
    llama = LlamaModel(llama_config).eval()
    mistral = MistralModel(mistral_config_like(llama_config)).eval()
    mistral.load_state_dict(llama.state_dict(), strict=True)
    ids = torch.randint(3, 500, (2, 300))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    with torch.inference_mode():
        a = llama(input_ids=ids, attention_mask=mask).last_hidden_state
        b = mistral(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)


def test_cached_default_model_is_smollm2_in_the_e5_architecture(real_model_dir):
    """The default is the raw SmolLM2 copy with the committed E5-recipe LoRA merged: its projections differ from the
    raw model's, what LoRA does not touch (token embedding, norms) is the raw model's bit for bit."""
    from safetensors import safe_open

    from lowmem_e5.default_model import E5_ADAPTER_DIR
    from lowmem_e5.hashing import file_sha256
    from lowmem_e5.runtime.sources import resolve_model_source

    raw_dir = Path(resolve_model_source("smollm2-raw")[0])
    assert Path(resolve_model_source("smollm2-e5")[0]) == real_model_dir != raw_dir
    assert file_sha256(E5_ADAPTER_DIR / "adapter_model.safetensors") in (real_model_dir / "SOURCE.txt").read_text()
    e5_weights, raw_weights = real_model_dir / "model.safetensors", raw_dir / "model.safetensors"
    with safe_open(e5_weights, "pt") as e5, safe_open(raw_weights, "pt") as raw:
        for name in ("embed_tokens.weight", "norm.weight", "layers.3.input_layernorm.weight"):
            assert torch.equal(e5.get_tensor(name), raw.get_tensor(name)), name
        for name in ("layers.3.self_attn.q_proj.weight", "layers.3.mlp.down_proj.weight"):
            assert not torch.equal(e5.get_tensor(name), raw.get_tensor(name)), name
    config = json.loads((real_model_dir / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralModel"]
    assert config["sliding_window"] is None
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)  # pad == EOS, as E5
    assert GGUF_SHA256 in (real_model_dir / "SOURCE.txt").read_text()


def test_a_merged_adapter_gives_the_vectors_of_the_unmerged_one(tmp_path, tiny_model_dir, tiny_adapters):
    """How the E5-recipe model is built: the LoRA merged into fp32 weights, saved as a plain model folder."""
    from lowmem_e5 import Embedder, RuntimeConfig, load_model
    from lowmem_e5.default_model import merge_adapter_into
    from lowmem_e5.runtime.pooling import rowwise_cosine

    from .conftest import MIXED_TEXTS

    merged_dir = merge_adapter_into(tiny_model_dir, tiny_adapters["A"], tmp_path / "merged", "test\n")
    assert (merged_dir / "SOURCE.txt").read_text() == "test\n" and not list(tmp_path.glob(".build-*"))
    base = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=128)))
    base.load_adapter("A", tiny_adapters["A"])
    merged = Embedder(load_model(RuntimeConfig(model=str(merged_dir), quant="fp32", max_length=128)))
    a, b = base.encode(MIXED_TEXTS, adapter="A")[0], merged.encode(MIXED_TEXTS)[0]
    assert rowwise_cosine(a, b).min() > 0.9999
    assert rowwise_cosine(base.encode(MIXED_TEXTS)[0], b).max() < 0.999  # the adapter is in the weights
