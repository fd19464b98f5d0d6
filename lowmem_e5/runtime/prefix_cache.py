"""The instruction prefix that all queries of one task share, run once and reused by every batch.

Every query is `Instruct: {task}\\nQuery: {text}`: for short queries most tokens are the instruction. Its keys and
values are computed once per (instruction, adapter state) and every later batch runs only the query tokens, their
positions continuing after the prefix, attending to the cached prefix. Causal attention makes the result the same
as running the whole row (up to float rounding): the prefix tokens never see what follows them.

The cached keys/values are read-only: each layer concatenates them with the batch's own keys for that layer and
stores nothing, so a cached batch holds no more memory than the same rows run whole. Rows of one batch may read
different prefixes (other instructions, other adapters: what a server's batch holds): the distinct prefixes are
left-padded to the longest, masked where padded, and each row's positions continue after its own prefix.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .instructions import query_prefix
from .tokenization import SpecialIds

MAX_CACHED_PREFIXES = 32  # one per (instruction, adapter); a 7B prefix of ~25 tokens is ~3 MB in fp16


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


def compute_prefix_state(model: torch.nn.Module, prefix: tuple[int, ...], device: str,
                         adapter: str | None = None) -> PrefixState:
    """adapter: in a mixed-adapter model (peft with adapter layers on), the adapter this prefix runs under."""
    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    extra = {"adapter_names": [adapter]} if adapter is not None else {}
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **extra)
    cache = out.cache
    layers = cache.layers
    return PrefixState(keys=tuple(layer.keys for layer in layers), values=tuple(layer.values for layer in layers))


@functools.cache
def _read_only_prefix_layer():
    """The cache layer class, made once (transformers is imported on first use, as everywhere in the package)."""
    from transformers.cache_utils import DynamicLayer

    class ReadOnlyPrefixLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, row_index: torch.Tensor | None) -> None:
            super().__init__()
            self.keys, self.values, self.row_index = keys, values, row_index  # (U, kv, P, hd), (B,) or None
            self.device = keys.device
            self.is_initialized = True

        def rows(self, cached: torch.Tensor, batch: int) -> torch.Tensor:
            if self.row_index is None:  # one prefix for all rows: a view, no copy
                return cached.expand(batch, -1, -1, -1)
            return cached.index_select(0, self.row_index)  # (B, kv, P, hd), for this layer only

        def update(self, key_states, value_states, *args, **kwargs):
            batch = key_states.shape[0]
            keys = torch.cat([self.rows(self.keys, batch), key_states], dim=-2)  # (B, kv, P + T, hd)
            values = torch.cat([self.rows(self.values, batch), value_states], dim=-2)
            return keys, values

    return ReadOnlyPrefixLayer


@dataclass(frozen=True)
class RowPrefixes:
    """The cached prefixes one batch reads: its distinct prefix states, left-padded to the longest and stacked, and
    which of them each row reads."""

    keys: tuple[torch.Tensor, ...]  # per layer (U, kv_heads, P, head_dim); row u's real prefix is its last lengths[u]
    values: tuple[torch.Tensor, ...]
    lengths: torch.Tensor  # (U,) real length of each distinct prefix
    row_index: torch.Tensor  # (B,) which distinct prefix each row reads

    @classmethod
    def of_rows(cls, states: list[PrefixState]) -> RowPrefixes:
        distinct: dict[int, int] = {}
        uniq: list[PrefixState] = []
        for state in states:
            if id(state) not in distinct:
                distinct[id(state)] = len(uniq)
                uniq.append(state)
        width = max(u.length for u in uniq)
        device = uniq[0].keys[0].device

        def stack(tensors: list[torch.Tensor]) -> torch.Tensor:  # each (1, kv, P_u, hd) -> (U, kv, width, hd)
            if len(tensors) == 1:
                return tensors[0]
            out = tensors[0].new_zeros((len(tensors), tensors[0].shape[1], width, tensors[0].shape[3]))
            for u, t in enumerate(tensors):
                out[u, :, width - t.shape[-2]:] = t[0]
            return out

        n_layers = len(uniq[0].keys)
        return cls(keys=tuple(stack([u.keys[i] for u in uniq]) for i in range(n_layers)),
                   values=tuple(stack([u.values[i] for u in uniq]) for i in range(n_layers)),
                   lengths=torch.tensor([u.length for u in uniq], dtype=torch.long),
                   row_index=torch.tensor([distinct[id(s)] for s in states], dtype=torch.long, device=device))

    @property
    def width(self) -> int:
        return int(self.keys[0].shape[-2])

    def batch_inputs(self, suffix_mask: torch.Tensor,
                     suffix_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask over prefix + suffix (B, P + T), the suffix's positions moved on past each row's own
        prefix (B, T)), from pad_rows' mask and positions."""
        row_lengths = self.lengths[self.row_index.cpu()]  # (B,)
        pad = self.width - row_lengths  # (B,) masked slots before each row's prefix
        prefix_mask = (torch.arange(self.width)[None, :] >= pad[:, None]).to(suffix_mask.dtype)  # (B, P)
        return torch.cat([prefix_mask, suffix_mask], dim=1), suffix_positions + row_lengths[:, None]


def reading_cache(prefixes: RowPrefixes):
    """A transformers Cache whose layers serve the prefixes to one batch and keep nothing of the batch."""
    from transformers.cache_utils import Cache

    layer = _read_only_prefix_layer()
    index = None if len(prefixes.lengths) == 1 else prefixes.row_index
    return Cache(layers=[layer(k, v, index) for k, v in zip(prefixes.keys, prefixes.values)])


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
