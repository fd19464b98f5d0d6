"""Token-budget batching: sort by length, then cut into batches that waste the fewest padded tokens.

A batch costs what it computes, rows x its longest row (padding included), plus a fixed cost per forward call
(kernel launches, reading the weights once); it may not exceed the token budget. Filling every batch up to the
budget, as fixed-size or greedy batching does, pads a 400-token text to the 1,700 tokens of the long texts
it happens to follow; the exact minimum over all ways of cutting the sorted list is cheap to find (dynamic
programming over cut points) and avoids that.
"""

from __future__ import annotations

import numpy as np

# Fixed cost of one forward call, in tokens of compute: on the small model on the 2-core CPU a call costs as much as
# about 45 more tokens in a bigger batch (`python scripts/bench.py`, "forward_fixed_cost"); a GPU re-reads all weights
# per call, so short batches cost it relatively more.
BATCH_COST_TOKENS = 40


def plan_batches(lengths: list[int], token_budget: int, batch_cost: int = BATCH_COST_TOKENS) -> list[list[int]]:
    """Group text indices into batches whose padded size (rows x longest row) stays within token_budget.

    Among all cuts of the length-sorted list, the one with the least total padded tokens + batch_cost per batch.
    Longest texts come first, so an out-of-memory error shows up in the first batch rather than the last.
    A text longer than the budget still gets a batch of its own.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget} is not valid; expected an integer >= 1")
    if batch_cost < 0:
        raise ValueError(f"batch_cost={batch_cost} is not valid; expected an integer >= 0")
    order = longest_first(lengths)
    n = len(order)
    if n == 0:
        return []
    widths = np.array([lengths[i] for i in order], dtype=np.int64)  # descending
    best = np.full(n + 1, np.inf)  # best[j]: least cost of batching the first j sorted rows
    best[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)  # start[j]: where the last batch of that best cut begins
    for i in range(n):  # a batch starting at sorted row i is padded to widths[i]
        k = max(1, min(n - i, token_budget // max(1, int(widths[i]))))
        candidate = best[i] + batch_cost + widths[i] * np.arange(1, k + 1)
        ends = slice(i + 1, i + k + 1)
        better = candidate < best[ends]
        best[ends] = np.where(better, candidate, best[ends])
        start[ends] = np.where(better, i, start[ends])
    batches: list[list[int]] = []
    j = n
    while j > 0:
        i = int(start[j])
        batches.append(order[i:j])
        j = i
    return batches[::-1]


def longest_first(lengths: list[int]) -> list[int]:
    """Text indices by descending length, ties in input order."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def padded_tokens(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def fixed_size_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """What fixed-size batching does (length-sorted, as sentence-transformers): for comparisons only."""
    order = longest_first(lengths)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
