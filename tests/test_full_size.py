"""The E5-Mistral-shaped folder: the real tokenizer (Mistral-7B-v0.1's, from mistral-common) with E5's config and
either post-processor, built at tiny size; the full-size shape checked on the meta device (the 7B run itself is
`python scripts/full_size_cpu.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mistral_common", reason="the real E5 tokenizer needs the extra [full-size]")

from lowmem_e5 import load_embedder  # noqa: E402
from lowmem_e5.quality.full_size import (E5_TOKENIZER_CONFIG, build_e5_shaped_folder, shards,  # noqa: E402
                                         tensor_shapes)
from lowmem_e5.quality.planner import e5_mistral_config, meta_model, plan_weights  # noqa: E402

from .conftest import DATA  # noqa: E402

HELLO = [22557, 1526]  # "Hello world" in Mistral-7B-v0.1's vocabulary


@pytest.fixture(scope="session")
def e5_tiny(tmp_path_factory):
    """The tiny folder twice: the hub's BOS-only post-processor, and one that appends the EOS too."""
    root = tmp_path_factory.mktemp("e5_tiny")
    return {pp: build_e5_shaped_folder(root / pp, tiny=True, post_processor=pp, progress=False)
            for pp in ("bos", "bos+eos")}


def test_the_folder_reproduces_the_hubs_eos_trap(e5_tiny):
    from transformers import AutoTokenizer

    bos_only = AutoTokenizer.from_pretrained(str(e5_tiny["bos"]))
    assert len(bos_only) == 32000 and bos_only.bos_token_id == 1 and bos_only.pad_token_id == 2
    assert bos_only("Hello world")["input_ids"] == [1, *HELLO]  # E5's config asks for the EOS; the tokenizer drops it
    assert AutoTokenizer.from_pretrained(str(e5_tiny["bos+eos"]))("Hello world")["input_ids"] == [1, *HELLO, 2]
    config = json.loads((e5_tiny["bos"] / "tokenizer_config.json").read_text())
    assert config["add_eos_token"] is True and config == E5_TOKENIZER_CONFIG


@pytest.mark.parametrize("post_processor", ["bos", "bos+eos"])
def test_rows_are_bos_content_eos_under_either_post_processor(e5_tiny, post_processor):
    e = load_embedder(model=str(e5_tiny[post_processor]), quant="fp32", max_length=32)
    docs = e.tokenize(["Hello world", "Hello world " * 40], query=False).rows
    assert list(docs[0]) == [1, *HELLO, 2]
    assert len(docs[1]) == 32 and docs[1][0] == 1 and docs[1][-1] == 2 and 2 not in list(docs[1][1:-1])  # cut content
    query = list(e.tokenize(["Hello world"], query=True, task="MSMARCO").rows[0])
    assert query[0] == 1 and query[-3:] == [*HELLO, 2] and query.count(1) == 1 and query.count(2) == 1


def test_the_full_pipeline_runs_on_the_tiny_folder_in_nf4(e5_tiny, tmp_path):
    out = tmp_path / "docs.npy"
    r = subprocess.run([sys.executable, "-m", "lowmem_e5", "encode", "--model", e5_tiny["bos"], "--quant", "nf4",
                        "--input", DATA / "sample_docs.txt", "--output", out, "--quiet"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    vectors = np.load(out)
    n = len((DATA / "sample_docs.txt").read_text().splitlines())
    assert vectors.shape == (n, 64) and np.all(np.isfinite(vectors))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    summary = json.loads(r.stdout)
    from lowmem_e5.quality.full_size import tiny_e5_config

    # on a CPU the unquantised parts (token embedding, norms) are float32: the planner states that case exactly
    assert summary["weight_bytes"] == plan_weights(meta_model(tiny_e5_config()), "nf4", compute_dtype="float32").total


def test_the_weights_are_fp16_shards_with_an_index(e5_tiny):
    from safetensors import safe_open

    folder = e5_tiny["bos"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    seen = 0
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                assert t.dtype == torch.float16 and index["weight_map"][name] == file
                seen += t.numel() * 2
                if name.endswith("norm.weight"):
                    assert torch.all(t == 1)
                else:
                    assert 0.015 < float(t.float().std()) < 0.025
    assert seen == index["metadata"]["total_size"]


def test_the_full_size_shape_is_e5_mistrals_and_shards_stay_under_the_limit():
    shapes = tensor_shapes(e5_mistral_config())
    assert sum(int(torch.Size(s).numel()) for _, s in shapes) == 7_110_660_096  # as published
    assert len(shapes) == 1 + 32 * 9 + 1 and dict(shapes)["layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    groups = shards(shapes, 5 * 10**9)
    assert len(groups) == 3 and [n for g in groups for n, _ in g] == [n for n, _ in shapes]
    assert all(sum(2 * int(torch.Size(s).numel()) for _, s in g) <= 5 * 10**9 for g in groups)


def test_building_needs_the_disk_space_and_says_so(tmp_path, monkeypatch):
    import shutil

    from lowmem_e5.errors import LowmemError

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(LowmemError, match="bytes free; the folder needs"):
        build_e5_shaped_folder(tmp_path / "x", tiny=False)
    assert not (tmp_path / "x").exists()
