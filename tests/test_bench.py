"""The benchmark compares like with like: sentence-transformers set up as its E5 users do sees the same token ids
and gives the same vectors as lowmem_e5; the timing helper rotates the order."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lowmem_e5.runtime.instructions import query_prefix, task_instruction
from lowmem_e5.runtime.pooling import rowwise_cosine

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts/bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engines(bench, real_model_dir):
    return bench.Ours("fp32"), bench.SentenceTransformers("fp32")


def test_workloads_fit_the_length_and_are_mixed(bench, engines):
    ours, _ = engines
    work = bench.workloads(ours.embedder.loaded.tokenizer)
    doc_lengths = ours.embedder.tokenize(work["documents"]).lengths
    assert max(doc_lengths) <= bench.MAX_LENGTH and max(doc_lengths) > 8 * min(doc_lengths)
    skewed = ours.embedder.tokenize(work["skewed"]).lengths
    assert max(skewed) == bench.MAX_LENGTH and sorted(skewed)[len(skewed) // 2] < 64  # a few long, most short
    assert len({t for _, t in work["queries"]}) >= 3


def test_both_engines_embed_the_same_tokens_to_the_same_vectors(bench, engines):
    ours, st = engines
    docs = ["Paris is the capital of France.", "ok", "def add(a, b):\n    return a + b " * 5]
    assert st.token_ids(docs) == ours.embedder.tokenize(docs).rows
    assert rowwise_cosine(ours.documents(docs)[0], st.documents(docs)).min() >= 0.999
    queries = [("capital of france", "MSMARCO"), ("who wrote hamlet", "NQ"), ("sort a list", "MSMARCO")]
    prompt = query_prefix(task_instruction("NQ"))
    assert st.token_ids(["who wrote hamlet"], prompt=prompt) == ours.embedder.tokenize(["who wrote hamlet"],
                                                                                        task="NQ").rows
    assert rowwise_cosine(ours.queries(queries), st.queries(queries)).min() >= 0.999
    # sentence-transformers pads its 32-row batches: never less than the real tokens
    assert bench.st_padded_tokens(st, docs) >= sum(ours.embedder.tokenize(docs).lengths)


def test_alternate_rotates_the_order_every_round():
    from lowmem_e5.timing import alternate

    seen = []
    times = alternate({n: (lambda n=n: seen.append(n)) for n in "abc"}, repeats=3)
    assert seen == list("abc" "bca" "cab") and all(len(v) == 3 for v in times.values())
