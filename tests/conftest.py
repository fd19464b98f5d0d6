"""Shared fixtures: the real small model (built once per machine into the cache) and a tiny random Mistral."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.default_model import ensure_default_model
from lowmem_e5.runtime.batching import plan_batches

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


def fill_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Batches as large as the budget allows (a per-batch cost above any padding): to test mixed-length batches."""
    return plan_batches(lengths, token_budget, batch_cost=10**9)


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


def train_test_adapter(base_dir: Path, out_dir: Path, seed: int, targets=("q_proj", "v_proj"), rank: int = 4,
                       steps: int = 4) -> Path:
    """A real peft LoRA adapter made by a few optimiser steps that pull embeddings towards a random direction."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from lowmem_e5.runtime.pooling import last_token_pool
    from lowmem_e5.runtime.tokenization import pad_rows, tokenize

    torch.manual_seed(seed)
    base = AutoModel.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                            lora_dropout=0.0))
    rows = tokenize(tok, ["domain text one", "another domain sentence", "third example"], 64).rows
    ids, mask, pos = pad_rows(rows, 2, "right")
    target = torch.nn.functional.normalize(torch.randn(base.config.hidden_size), dim=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        pooled = torch.nn.functional.normalize(last_token_pool(hidden, mask), dim=-1)
        loss = (1 - pooled @ target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "A": train_test_adapter(tiny_model_dir, root / "A", seed=1),
        "B": train_test_adapter(tiny_model_dir, root / "B", seed=2),
        "C": train_test_adapter(tiny_model_dir, root / "C", seed=3, targets=("down_proj",), rank=8),
    }


def write_corpus(folder: Path, shards: int, rows: int, fmt: str = "jsonl", id_prefix: str | None = "doc-") -> dict:
    """A corpus of real sentences in shards named part-K; returns {id: text} (ids are ints when id_prefix is None)."""
    import json

    lines = (DATA / "sample_docs.txt").read_text().splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    corpus: dict = {}
    k = 0
    for s in range(shards):
        records = []
        for _ in range(rows):
            text = f"{lines[k % len(lines)]} (passage {k}, {' '.join(lines[(k * 7) % len(lines)].split()[: k % 9])})"
            key = k if id_prefix is None else f"{id_prefix}{k}"
            records.append({"id": key, "text": text})
            corpus[key] = text
            k += 1
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), folder / f"part-{s}.parquet")
        else:
            (folder / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return corpus


@pytest.fixture
def cli_main(capsys):
    """`lowmem-e5 ARGS` in this process (no interpreter start-up): returns (exit status, stdout, stderr). The CLI's
    terminal settings (root log handler, warning filters, environment defaults) are put back afterwards."""
    import logging
    import os
    import warnings

    from lowmem_e5.cli.main import main

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, dict(os.environ), logging.getLogger("torch").level)

    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        with warnings.catch_warnings():
            rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    yield run
    root.handlers[:], _, env, torch_level = saved
    root.setLevel(saved[1])
    logging.getLogger("torch").setLevel(torch_level)
    os.environ.clear()
    os.environ.update(env)
