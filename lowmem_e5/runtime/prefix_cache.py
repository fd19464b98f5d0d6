"""The instruction prefix that all queries of one task share, run once and reused by every batch.

Every query is `Instruct: {task}\\nQuery: {text}`: for short queries most tokens are the instruction. Its keys and
values are computed once per (instruction, adapter state) and every later batch runs only the query tokens, their
positions continuing after the prefix, attending to the cached prefix. Causal attention makes the result the same
as running the whole row (up to float rounding): the prefix tokens never see what follows them.

The cached keys/values are read-only: each layer concatenates them with the batch's own keys for that layer and
stores nothing, so a cached batch holds no more memory than the same rows run whole.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .instructions import query_prefix
from .tokenization import SpecialIds

MAX_CACHED_PREFIXES = 16  # one per (instruction, adapter state); a 7B prefix of ~25 tokens is ~3 MB in fp16


def shared_prefix_ids(tokenizer, special: SpecialIds, instruction: str) -> tuple[int, ...]:
    """Token ids every row of this instruction starts with: BOS + the prefix's tokens but its last one.

    The last token is left out because it can merge with the query's first word ("Query: " + "what" gives
    ":", " what", not ":", " ", "what"); rows are checked to start with the result before the cache is used.
    """
    ids = tokenizer(query_prefix(instruction), add_special_tokens=False)["input_ids"]
    head = [special.bos] if special.bos is not None else []
    return tuple(head + list(ids[:-1]))


def split_rows(rows: list[list[int]], prefix: tuple[int, ...]) -> list[list[int] | None]:
    """Each row's tokens after the prefix, or None where the row does not start with it (or is nothing more)."""
    n = len(prefix)
    return [row[n:] if len(row) > n and tuple(row[:n]) == prefix else None for row in rows]


@dataclass(frozen=True)
class PrefixState:
    """Keys and values of one prefix, per layer, each (1, kv_heads, prefix_len, head_dim)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2])


def compute_prefix_state(model: torch.nn.Module, prefix: tuple[int, ...], device: str) -> PrefixState:
    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = out.cache
    layers = cache.layers
    return PrefixState(keys=tuple(layer.keys for layer in layers), values=tuple(layer.values for layer in layers))


@functools.cache
def _read_only_prefix_layer():
    """The cache layer class, made once (transformers is imported on first use, as everywhere in the package)."""
    from transformers.cache_utils import DynamicLayer

    class ReadOnlyPrefixLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.device = keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            batch = key_states.shape[0]
            keys = torch.cat([self.keys.expand(batch, -1, -1, -1), key_states], dim=-2)
            values = torch.cat([self.values.expand(batch, -1, -1, -1), value_states], dim=-2)
            return keys, values

    return ReadOnlyPrefixLayer


def reading_cache(state: PrefixState):
    """A transformers Cache whose layers serve the prefix to one batch and keep nothing of the batch."""
    from transformers.cache_utils import Cache

    layer = _read_only_prefix_layer()
    return Cache(layers=[layer(k, v) for k, v in zip(state.keys, state.values)])


def prefix_batch_inputs(suffix_mask: torch.Tensor, suffix_positions: torch.Tensor,
                        prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask over prefix + suffix, the suffix's positions moved on past the prefix), from pad_rows'."""
    batch = suffix_mask.shape[0]
    mask = torch.cat([torch.ones((batch, prefix_len), dtype=suffix_mask.dtype), suffix_mask], dim=1)
    return mask, suffix_positions + prefix_len


class PrefixStore:
    """Least-recently-used prefix states, keyed by (prefix token ids, adapter state)."""

    def __init__(self, max_entries: int = MAX_CACHED_PREFIXES) -> None:
        self.max_entries = max_entries
        self._states: OrderedDict[tuple, PrefixState] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, compute) -> PrefixState:
        if key in self._states:
            self._states.move_to_end(key)
            self.hits += 1
            return self._states[key]
        self.misses += 1
        state = compute()
        self._states[key] = state
        while len(self._states) > self.max_entries:
            self._states.popitem(last=False)
        return state

    def clear(self) -> None:
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)
