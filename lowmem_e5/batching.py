"""Token-budget batching: sort by length, fill each batch up to a budget of padded tokens."""

from __future__ import annotations


def plan_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group text indices into batches whose padded size (rows x longest row) stays within token_budget.

    Longest texts come first, so an out-of-memory error shows up in the first batch rather than the last.
    A text longer than the budget still gets a batch of its own.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget} is not valid; expected an integer >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # descending: the first row is the widest
        if current and (len(current) + 1) * width > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padded_tokens(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)
