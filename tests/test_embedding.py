"""Embeddings as the official E5 code makes them, and identical however a text is batched."""

import random

import numpy as np
import pytest
import torch

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.errors import InputError, OutOfMemoryError
from lowmem_e5.runtime.instructions import TASK_INSTRUCTIONS, format_query
from lowmem_e5.runtime.pooling import rowwise_cosine

from .conftest import MIXED_TEXTS, fill_batches


def with_config(embedder: Embedder, few_batches: bool = False, **changes) -> Embedder:
    """Same loaded weights, other runtime settings; few_batches: batches as large as the budget allows."""
    loaded = embedder.loaded
    clone = type(loaded)(model=loaded.model, tokenizer=loaded.tokenizer, config=loaded.config.replace(**changes),
                         source=loaded.source, device=loaded.device, weight_bytes=loaded.weight_bytes)
    e = Embedder(clone)
    if few_batches:  # a per-batch cost above any padding: the planner then only cuts where the budget forces it
        e.plan = fill_batches
    return e


@pytest.mark.parametrize("which", ["tiny_embedder", "real_fp32"])
def test_same_text_same_vector_alone_batched_padded_either_side_and_shuffled(which, request):
    embedder = request.getfixturevalue(which)
    alone = np.stack([embedder.encode([t])[0][0] for t in MIXED_TEXTS])
    for side in ("left", "right"):
        e = with_config(embedder, few_batches=True, padding_side=side, token_budget=100_000)
        batched, stats = e.encode(MIXED_TEXTS)
        assert stats.n_batches == 1 and stats.padded_tokens > stats.real_tokens  # really one mixed-length batch
        assert rowwise_cosine(batched, alone).min() >= 0.9999
        order = list(range(len(MIXED_TEXTS)))
        random.Random(3).shuffle(order)
        shuffled = e.encode([MIXED_TEXTS[i] for i in order])[0]
        assert rowwise_cosine(shuffled, alone[order]).min() >= 0.9999
    small_batches, stats = with_config(embedder, token_budget=60).encode(MIXED_TEXTS)
    assert stats.n_batches > 2
    assert rowwise_cosine(small_batches, alone).min() >= 0.9999


def test_rows_are_unit_norm_float32_in_input_order(real_fp32):
    vectors, stats = real_fp32.encode(MIXED_TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(MIXED_TEXTS), 576)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert stats.real_tokens == sum(real_fp32.tokenize(MIXED_TEXTS).lengths)
    # in input order: row i is text i
    assert rowwise_cosine(vectors[3:4], real_fp32.encode([MIXED_TEXTS[3]])[0]).item() >= 0.9999


def test_pooled_vector_is_the_hidden_state_of_the_appended_eos(real_fp32):
    tok = real_fp32.loaded.tokenizer
    text = "A query about pooling."
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.inference_mode():
        hidden = real_fp32.loaded.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (T, H)
    eos_state = torch.nn.functional.normalize(hidden[-1], dim=0).numpy()
    content_state = torch.nn.functional.normalize(hidden[-2], dim=0).numpy()
    got = real_fp32.encode([text])[0][0]
    assert float(got @ eos_state) >= 0.9999
    assert float(got @ content_state) < 0.99  # reading the last content token instead would be caught


def test_queries_get_the_official_instruction_and_documents_none(real_fp32):
    q = "how do plants make energy"
    by_task = real_fp32.encode_queries([q], task="MSMARCO")
    manual = real_fp32.encode_documents([f"Instruct: {TASK_INSTRUCTIONS['MSMARCO']}\nQuery: {q}"])
    assert rowwise_cosine(by_task, manual).min() >= 0.9999
    free = real_fp32.encode_queries([q], instruction="Find recipes")
    assert rowwise_cosine(free, real_fp32.encode_documents([format_query(q, "Find recipes")])).min() >= 0.9999
    assert rowwise_cosine(by_task, real_fp32.encode_documents([q])).max() < 0.999


def test_unknown_task_lists_the_valid_ones(tiny_embedder):
    with pytest.raises(InputError, match="unknown task 'Nope'; expected one of: STS, Summarization"):
        tiny_embedder.encode_queries(["x"], task="Nope")


@pytest.mark.parametrize("bad, message", [(["ok", "   "], "text #1 is empty or whitespace only"),
                                          (["ok", 3], "text #1 is int; expected a string"),
                                          ("one string", "list of strings")])
def test_bad_texts_are_named(tiny_embedder, bad, message):
    with pytest.raises(InputError, match=message):
        tiny_embedder.encode(bad)


def test_out_of_memory_halves_the_budget_and_retries(tiny_embedder, monkeypatch):
    e = with_config(tiny_embedder, few_batches=True, token_budget=100_000)
    expected = e.encode(MIXED_TEXTS)[0]
    real_forward = e._forward
    seen_sizes = []

    def forward_that_runs_out_above_200_tokens(rows, adapter_names=None, prefix=None):
        # Stand-in for the CUDA allocator failing: the CPU has no memory limit to hit.
        size = len(rows) * max(len(r) for r in rows)
        seen_sizes.append(size)
        if size > 200:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(rows)

    monkeypatch.setattr(e, "_forward", forward_that_runs_out_above_200_tokens)
    got, stats = e.encode(MIXED_TEXTS)
    assert stats.oom_retries >= 1 and e.token_budget <= 200
    assert rowwise_cosine(got, expected).min() >= 0.9999
    assert seen_sizes[0] > 200 and max(seen_sizes[-stats.n_batches:]) <= 200


def test_a_row_that_does_not_fit_alone_is_a_clear_error(tiny_embedder, monkeypatch):
    e = with_config(tiny_embedder)

    def always_out_of_memory(rows, adapter_names=None, prefix=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(e, "_forward", always_out_of_memory)
    with pytest.raises(OutOfMemoryError, match=r"text #\d+ \(\d+ tokens\) does not fit on cpu even alone"):
        e.encode(["a", "b c"])


def test_non_finite_output_is_refused(tiny_model_dir, fresh_copy):
    folder = fresh_copy(tiny_model_dir)
    e = Embedder(load_model(RuntimeConfig(model=str(folder), quant="fp32")))
    with torch.no_grad():
        e.loaded.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite embeddings"):
        e.encode(["hello"])
