"""Query prefix caching: the instruction runs once, and the vectors are those of the whole rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowmem_e5 import Embedder, RuntimeConfig, load_model
from lowmem_e5.runtime.instructions import TASK_INSTRUCTIONS, format_query
from lowmem_e5.runtime.pooling import rowwise_cosine
from lowmem_e5.runtime.prefix_cache import PrefixStore, shared_prefix_ids, split_rows

from .conftest import fill_batches

QUERIES = ["what is the capital of france", "how do I sort a list in python", "x", "why is the sky blue",
           "symptoms of flu in adults over sixty who also have asthma and a history of pneumonia", "ok?"]


def with_prefix_cache(e: Embedder, on: bool) -> Embedder:
    e.config = e.config.replace(cache_query_prefix=on)
    return e


@pytest.fixture(scope="module")
def real_nf4(real_model_dir) -> Embedder:
    return Embedder(load_model(RuntimeConfig(model=str(real_model_dir), quant="nf4", max_length=512)))


@pytest.mark.parametrize("which", ["real_fp32", "real_nf4"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_prefix_gives_the_vectors_of_whole_rows(request, which, side):
    e = request.getfixturevalue(which)
    e.config = e.config.replace(padding_side=side)
    try:
        whole, whole_stats = with_prefix_cache(e, False).encode(QUERIES, task="MSMARCO")
        cached, stats = with_prefix_cache(e, True).encode(QUERIES, task="MSMARCO")
    finally:
        e.config = e.config.replace(padding_side="right", cache_query_prefix=True)
    assert whole_stats.prefix_reused_tokens == 0
    prefix = shared_prefix_ids(e.loaded.tokenizer, e.special, TASK_INSTRUCTIONS["MSMARCO"])
    assert stats.prefix_reused_tokens == len(QUERIES) * len(prefix) > 0
    assert rowwise_cosine(cached, whole).min() >= 0.9999
    assert stats.real_tokens == whole_stats.real_tokens  # the same rows, only fewer of their tokens run


def test_prefix_is_computed_once_per_instruction_and_reused(real_fp32):
    e = with_prefix_cache(real_fp32, True)
    e.prefixes.clear()
    hits, misses = e.prefixes.hits, e.prefixes.misses
    e.encode(QUERIES[:2], task="MSMARCO")
    e.encode(QUERIES[2:], task="MSMARCO")
    e.encode(QUERIES[:2], instruction="Given a bug report, find the fixing commit")
    assert (e.prefixes.misses - misses, e.prefixes.hits - hits) == (2, 1)
    assert len(e.prefixes) == 2


def test_rows_split_after_the_shared_tokens_only_where_they_match(real_fp32):
    tok, special = real_fp32.loaded.tokenizer, real_fp32.special
    inst = TASK_INSTRUCTIONS["NQ"]
    prefix = shared_prefix_ids(tok, special, inst)
    rows = real_fp32.tokenize(["what", "who wrote it"], instruction=inst).rows
    suffixes = split_rows(rows + [[special.bos, 5, 6, special.eos], list(prefix)], prefix)
    assert suffixes[0] == rows[0][len(prefix):] and suffixes[1] == rows[1][len(prefix):]
    assert suffixes[2] is None and suffixes[3] is None  # other start; nothing after the prefix
    # The prefix's own last token (a space) merges with the query's first word, so it is not shared.
    whole = tok(format_query("what", inst), add_special_tokens=False)["input_ids"]
    alone = tok(format_query("", inst), add_special_tokens=False)["input_ids"]
    assert whole[: len(alone)] != alone and whole[: len(alone) - 1] == alone[:-1]
    assert len(prefix) == (special.bos is not None) + len(alone) - 1


def test_a_query_that_does_not_start_with_the_prefix_runs_whole(real_fp32, monkeypatch):
    expected = with_prefix_cache(real_fp32, False).encode(QUERIES[:3], task="NQ")[0]
    e = with_prefix_cache(real_fp32, True)
    import lowmem_e5.runtime.encoder as encoder_module

    real_split = encoder_module.split_rows
    monkeypatch.setattr(encoder_module, "split_rows", lambda rows, prefix: [None] + real_split(rows, prefix)[1:])
    got, stats = e.encode(QUERIES[:3], task="NQ")
    assert stats.prefix_reused_tokens == 2 * len(shared_prefix_ids(e.loaded.tokenizer, e.special,
                                                                    TASK_INSTRUCTIONS["NQ"]))
    assert rowwise_cosine(got, expected).min() >= 0.9999


def test_prefix_cache_follows_the_active_adapter(tiny_model_dir, tiny_adapters):
    e = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=512)))
    e.load_adapter("A", tiny_adapters["A"])
    e.load_adapter("B", tiny_adapters["B"])
    cached = {a: with_prefix_cache(e, True).encode(QUERIES, task="NQ", adapter=a)[0] for a in (None, "A", "B", "A")}
    whole = {a: with_prefix_cache(e, False).encode(QUERIES, task="NQ", adapter=a)[0] for a in (None, "A", "B")}
    for a in (None, "A", "B"):
        assert rowwise_cosine(cached[a], whole[a]).min() >= 0.9999, a
    assert rowwise_cosine(whole["A"], whole[None]).min() < 0.999  # the adapters do change the vectors
    assert rowwise_cosine(whole["A"], whole["B"]).min() < 0.999
    # Mixed adapters in one call: each row reads the prefix computed under its own adapter.
    e = with_prefix_cache(e, True)
    mixed, stats = e.encode(QUERIES[:3], task="NQ", adapter=["A", None, "B"])
    assert stats.prefix_reused_tokens == 3 * len(shared_prefix_ids(e.loaded.tokenizer, e.special,
                                                                   TASK_INSTRUCTIONS["NQ"]))
    assert rowwise_cosine(mixed, np.stack([whole["A"][0], whole[None][1], whole["B"][2]])).min() >= 0.9999
    # Deleting and reloading an adapter under the same name invalidates its cached prefix.
    e.adapters.delete("A")
    e.load_adapter("A", tiny_adapters["B"])
    assert rowwise_cosine(e.encode(QUERIES, task="NQ", adapter="A")[0], whole["B"]).min() >= 0.9999


def test_documents_never_use_the_prefix_cache(real_fp32):
    _, stats = with_prefix_cache(real_fp32, True).encode(QUERIES[:2])
    assert stats.prefix_reused_tokens == 0


def test_prefix_store_keeps_the_most_recent_entries():
    store = PrefixStore(max_entries=2)
    made = []
    for key in ("a", "b", "a", "c", "b"):
        store.get((key,), lambda k=key: made.append(k) or torch.zeros(1))
    assert made == ["a", "b", "c", "b"]  # "b" was evicted by "c" (least recently used), "a" was kept
    assert len(store) == 2 and store.hits == 1


def test_out_of_memory_on_a_cached_batch_re_splits_it_and_keeps_the_prefix(real_fp32, monkeypatch):
    e = Embedder(real_fp32.loaded)  # its own budget, which the simulated failures lower
    e.plan = fill_batches  # one batch while it fits
    expected = with_prefix_cache(Embedder(real_fp32.loaded), False).encode(QUERIES, task="MSMARCO")[0]
    real_forward = e._forward
    seen = []

    def forward_that_runs_out_above_two_rows(rows, adapter_names=None, prefix=None):
        seen.append((len(rows), prefix is not None))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(rows, adapter_names, prefix)

    monkeypatch.setattr(e, "_forward", forward_that_runs_out_above_two_rows)
    got, stats = e.encode(QUERIES, task="MSMARCO")
    assert stats.oom_retries >= 1 and all(via_prefix for _, via_prefix in seen)
    assert stats.prefix_reused_tokens > 0
    assert rowwise_cosine(got, expected).min() >= 0.9999


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_batch_mixing_instructions_adapters_and_documents_gives_each_row_its_whole_row_vector(
        tiny_model_dir, tiny_adapters, side):
    """A server's batch: queries of several instructions (prefixes of different lengths) and documents, under
    several adapters, in shared forward batches; every row equals its own row run whole with its adapter."""
    e = Embedder(load_model(RuntimeConfig(model=str(tiny_model_dir), quant="fp32", max_length=512,
                                          padding_side=side)))
    e.load_adapter("A", tiny_adapters["A"])
    e.load_adapter("B", tiny_adapters["B"])
    tasks = ["NQ", "STS", None, "SciFact", "NQ", None, "STS", "NQ"]
    adapters = ["A", None, "B", "B", None, "A", "A", "B"]
    texts = [QUERIES[i % len(QUERIES)] for i in range(len(tasks))]
    tok = e.tokenize([format_query(t, TASK_INSTRUCTIONS[k]) if k else t for t, k in zip(texts, tasks)])
    instructions = [TASK_INSTRUCTIONS[k] if k else None for k in tasks]
    mixed, stats = with_prefix_cache(e, True).encode_tokenized(tok, instruction=instructions, adapter=adapters)
    assert stats.prefix_reused_tokens > 0 and stats.n_batches == 2  # one batch of cached rows, one of whole rows
    want = np.stack([
        with_prefix_cache(e, False).encode([t], task=k, adapter=a)[0][0] for t, k, a in zip(texts, tasks, adapters)])
    assert rowwise_cosine(mixed, want).min() >= 0.9999
    assert len({len(shared_prefix_ids(e.loaded.tokenizer, e.special, TASK_INSTRUCTIONS[k])) for k in
                ("NQ", "STS", "SciFact")}) > 1  # the prefixes really differ in length
