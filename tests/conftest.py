"""Shared fixtures: the real small model (built once per machine into the cache) and a tiny random Mistral."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.default_model import ensure_default_model

DATA = Path(__file__).parent / "data"

MIXED_TEXTS = [
    "Paris is the capital of France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen.",
    "ok",
    "The mitochondria is the powerhouse of the cell; it produces ATP through oxidative phosphorylation. " * 3,
    "def add(a, b):\n    return a + b",
    "Le chat dort sur le canapé depuis ce matin.",
    "3.14159 is an approximation of pi; e is about 2.71828.",
]


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir) -> Path:
    """A 2-layer random MistralModel with the real SmolLM2 tokenizer (vocab 49152): logic tests, fast."""
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    folder = tmp_path_factory.mktemp("tiny-mistral")
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, sliding_window=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, architectures=["MistralModel"],
    )
    MistralModel(config).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(real_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_embedder(tiny_model_dir) -> Embedder:
    return Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=512)))


@pytest.fixture(scope="session")
def real_fp32(real_model_dir) -> Embedder:
    return Embedder(load_model(RuntimeConfig(model=str(real_model_dir), quant="fp32", max_length=512)))


@pytest.fixture
def fresh_copy(tmp_path):
    """Copy a model folder so a test may change it."""
    def copy(src: Path) -> Path:
        dst = tmp_path / "model"
        shutil.copytree(src, dst)
        return dst
    return copy
