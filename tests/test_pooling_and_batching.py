import itertools

import numpy as np
import pytest
import torch

from lowmem_e5.runtime.batching import BATCH_COST_TOKENS, fixed_size_batches, padded_tokens, plan_batches
from lowmem_e5.runtime.pooling import cosine_matrix, last_token_indices, last_token_pool, rowwise_cosine


def test_last_token_index_from_the_mask_for_left_right_and_mixed_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0],   # right padded
                         [0, 0, 1, 1, 1],   # left padded
                         [1, 1, 1, 1, 1]])  # full
    assert last_token_indices(mask).tolist() == [2, 4, 4]
    hidden = torch.arange(3 * 5 * 2, dtype=torch.float32).reshape(3, 5, 2)
    pooled = last_token_pool(hidden, mask)
    assert torch.equal(pooled, torch.stack([hidden[0, 2], hidden[1, 4], hidden[2, 4]]))


def test_pooling_refuses_an_empty_row():
    with pytest.raises(ValueError, match="no real token"):
        last_token_indices(torch.tensor([[1, 1], [0, 0]]))


def test_cosine_is_computed_in_fp32_from_half_inputs():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4096)).astype(np.float16)
    exact = cosine_matrix(a.astype(np.float64), a.astype(np.float64))
    got = cosine_matrix(a, a)
    assert got.dtype == np.float32
    assert np.abs(got - exact).max() < 1e-5
    assert np.allclose(rowwise_cosine(a, a), 1.0, atol=1e-6)


def test_batches_cover_every_index_once_longest_first_within_budget():
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(3, 300, size=200)]
    batches = plan_batches(lengths, token_budget=1000)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches:
        assert padded_tokens(b, lengths) <= 1000


def test_a_text_longer_than_the_budget_gets_a_batch_of_its_own():
    assert plan_batches([50, 10, 10], token_budget=20) == [[0], [1, 2]]


def test_token_budget_batching_pads_less_than_fixed_size_batches_on_a_skewed_mix():
    # 90% short queries, 10% long documents, shuffled: what a retrieval corpus looks like.
    rng = np.random.default_rng(2)
    lengths = [int(x) for x in np.concatenate([rng.integers(8, 32, 900), rng.integers(400, 512, 100)])]
    rng.shuffle(lengths)
    budget = plan_batches(lengths, token_budget=4096)
    sorted_fixed = fixed_size_batches(lengths, 32)  # length-sorted, as sentence-transformers does
    input_order = [list(range(i, min(i + 32, len(lengths)))) for i in range(0, len(lengths), 32)]
    budget_padded = sum(padded_tokens(b, lengths) for b in budget)
    assert budget_padded < 0.9 * sum(padded_tokens(b, lengths) for b in sorted_fixed)  # 1.01x vs 1.20x real
    assert budget_padded < 0.2 * sum(padded_tokens(b, lengths) for b in input_order)
    assert budget_padded <= 1.05 * sum(lengths)


def _cost(batches, lengths, cost):
    return sum(padded_tokens(b, lengths) + cost for b in batches)


@pytest.mark.parametrize("seed", range(6))
def test_batches_are_the_cheapest_cut_of_the_sorted_lengths(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.choice([3, 5, 9, 40, 41, 120, 300], size=9)]
    budget = 400
    got = plan_batches(lengths, budget, batch_cost=BATCH_COST_TOKENS)
    order = sorted(range(9), key=lambda i: (-lengths[i], i))
    best = None
    for cuts in itertools.product([False, True], repeat=8):  # every way to cut the sorted list
        batches, current = [], [order[0]]
        for cut, i in zip(cuts, order[1:]):
            if cut:
                batches.append(current)
                current = []
            current.append(i)
        batches.append(current)
        if all(padded_tokens(b, lengths) <= budget or len(b) == 1 for b in batches):
            c = _cost(batches, lengths, BATCH_COST_TOKENS)
            best = c if best is None else min(best, c)
    assert _cost(got, lengths, BATCH_COST_TOKENS) == best


def test_a_few_long_texts_do_not_pad_the_medium_ones():
    # Filling each batch up to the budget would pad the 450-token texts to 1,700 (what the calibration set does).
    lengths = [1700] * 4 + [450] * 12 + [30] * 40
    batches = plan_batches(lengths, token_budget=16384)
    assert all(len({lengths[i] for i in b}) == 1 for b in batches)
    assert sum(padded_tokens(b, lengths) for b in batches) == sum(lengths)
