"""finetune: the E5 recipe (InfoNCE with in-batch negatives) lowers its loss, writes an adapter the runtime loads,
trains through 4-bit layers (non-zero LoRA gradients after an inference pass), resumes, and refuses bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.errors import InputError, ResumeMismatchError
from lowmem_e5.quality.beir import load_beir
from lowmem_e5.quality.finetune import FinetuneConfig, info_nce, pairs_from_beir, read_pairs, train_adapter
from lowmem_e5.runtime.pooling import rowwise_cosine

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ROOT / "calibration/labelled_v1/packages"
INSTRUCTION = "Given a one-line summary of a software package, retrieve its full description"


@pytest.fixture(scope="module")
def pairs():
    return pairs_from_beir(load_beir(PACKAGES, "train"))[:16]  # real (summary, description) pairs


def small(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"rank": 4, "epochs": 4, "batch_size": 8, "lr": 5e-3, "max_length": 64,
                             "checkpoint_every": 2, **kw})


def test_finetune_lowers_the_loss_and_writes_an_adapter_the_runtime_loads(tmp_path, tiny_model_dir, pairs):
    config = RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=128)
    record = train_adapter(config, pairs, small(), tmp_path / "ad", instruction=INSTRUCTION, progress=False)
    losses = record["losses"]
    assert len(losses) == record["steps"] == 8
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    assert {p.name for p in (tmp_path / "ad").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                              "finetune.json"}
    assert not (tmp_path / "ad.partial").exists()
    e = Embedder(load_model(config))
    base = e.encode_documents([p.document for p in pairs[:4]])
    e.load_adapter("ft", tmp_path / "ad")
    tuned = e.encode_documents([p.document for p in pairs[:4]], adapter="ft")
    assert rowwise_cosine(base, tuned).max() < 0.999


def test_lora_gradients_through_nf4_layers_are_non_zero_after_an_inference_pass(tiny_model_dir, pairs):
    """bitsandbytes repacks a 4-bit layer for the CPU at its first no-grad forward, after which LoRA gradients
    through it are silently zero; the runtime's loader turns that off."""
    from peft import LoraConfig, get_peft_model

    e = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="nf4", max_length=64)))
    e.encode_documents([p.document for p in pairs[:2]])  # the inference pass that would repack
    model = get_peft_model(e.loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    from lowmem_e5.quality.finetune import _embed

    q = _embed(model, e.tokenize([p.query for p in pairs[:4]], query=True, instruction=INSTRUCTION).rows, 2, "cpu")
    d = _embed(model, e.tokenize([p.document for p in pairs[:4]]).rows, 2, "cpu")
    info_nce(q, d, 0.02).backward()
    # lora_B: at initialisation B = 0, so A's gradient is 0 by construction; B's in layer 0 needs gradients that
    # flowed back through every 4-bit layer above it
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()


def test_an_interrupted_finetune_resumes_to_the_same_adapter(tmp_path, tiny_model_dir, pairs):
    config = RuntimeConfig(model=str(tiny_model_dir), quant="fp32")
    whole = train_adapter(config, pairs, small(), tmp_path / "whole", instruction=INSTRUCTION, progress=False)
    stopped = train_adapter(config, pairs, small(), tmp_path / "ad", instruction=INSTRUCTION, progress=False,
                            stop_after=3)
    assert stopped == {"stopped_at_step": 3, "total_steps": 8} and (tmp_path / "ad.partial").is_dir()
    with pytest.raises(ResumeMismatchError, match=r"ad.partial holds a run with other finetune; pass --restart"):
        train_adapter(config, pairs, small(lr=1e-3), tmp_path / "ad", instruction=INSTRUCTION, progress=False)
    resumed = train_adapter(config, pairs, small(), tmp_path / "ad", instruction=INSTRUCTION, progress=False)
    assert np.allclose(resumed["losses"], whole["losses"], atol=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("whole", "ad"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_pairs_of_several_tasks_keep_their_own_instructions(tmp_path, tiny_model_dir, pairs):
    """E5 trains on several tasks at once: each BEIR folder's queries carry their instruction."""
    from dataclasses import replace

    mixed = [replace(p, instruction=INSTRUCTION if i % 2 else "Retrieve parallel sentences.")
             for i, p in enumerate(pairs)]
    from lowmem_e5.quality.finetune import epoch_batches, query_rows

    e = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=64)))
    rows = query_rows(e, mixed, None)
    for p, row in zip(mixed, rows):
        assert row == e.tokenize([p.query], query=True, instruction=p.instruction).rows[0]
    for batch in epoch_batches(mixed, 8, seed=0):  # a batch's negatives come from its own task
        assert len({mixed[i].instruction for i in batch}) == 1 and len(batch) == 8
    config = RuntimeConfig(model=str(tiny_model_dir), quant="fp32")
    record = train_adapter(config, mixed, small(epochs=1), tmp_path / "ad", progress=False)
    assert record["steps"] == 2 and record["instruction"] is None
    with pytest.raises(InputError, match="need --task or --instruction"):
        train_adapter(config, pairs, small(epochs=1), tmp_path / "ad2", progress=False)


def test_bad_pairs_and_settings_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    for text, message in ((' {"query": "q"}\n{"query": "q", "document": "d"}', r"line 1: 'document' is missing"),
                          ('{"query": "q", "document": ""}\n{"query": "q", "document": "d"}',
                           r"line 1: 'document' is empty"),
                          ('{"query": "q", "document": "d"}\n[1]', r"p.jsonl:2: expected a JSON object, got list"),
                          ('{"query": "q", "document": "d"', r"p.jsonl:1: malformed JSON"),
                          ('{"query": "q", "document": "d"}', r"has 1 pairs; expected at least 2")):
        path.write_text(text)
        with pytest.raises(InputError, match=message):
            read_pairs(path)
    with pytest.raises(InputError, match="does not exist"):
        read_pairs(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="in-batch negatives need a second pair"):
        FinetuneConfig(batch_size=1)


def test_finetune_command_scores_heldout_retrieval_before_and_after(tmp_path, tiny_model_dir):
    beir = tmp_path / "b"
    (beir / "qrels").mkdir(parents=True)
    split = load_beir(PACKAGES, "train")
    rows = [(q, next(iter(split.qrels[q]))) for q in split.query_ids[:24]]
    text_of = dict(zip(split.doc_ids, split.doc_texts))
    qtext = dict(zip(split.query_ids, split.query_texts))
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": text_of[d]}) + "\n" for _, d in rows))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": qtext[q]}) + "\n" for q, _ in rows))
    for name, part in (("train", rows[:16]), ("test", rows[16:])):
        (beir / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\t{d}\t1\n" for q, d in part))
    out = tmp_path / "ad"
    r = subprocess.run([sys.executable, "-m", "lowmem_e5", "finetune", "--beir", str(beir), "--model",
                        str(tiny_model_dir), "--quant", "fp32", "--instruction", INSTRUCTION, "--output", str(out),
                        "--batch-size", "8", "--epochs", "2", "--train-max-length", "64", "--rank", "4",
                        "--eval-beir", str(beir), "--max-length", "128", "--quiet"],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "LOWMEM_E5_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "finetune.json").read_text())
    [heldout] = record["heldout"]
    assert record["steps"] == 4 and heldout["queries"] == 8
    assert set(heldout["before"]) == {"nDCG@10", "Recall@100", "MRR@10"} and heldout["before"] != heldout["after"]
