"""Texts in, unit-norm embeddings out: E5 formatting, token-budget batches, last-token pooling."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError, OutOfMemoryError
from .adapters import BASE, AdapterInfo, AdapterSet
from .batching import padded_tokens, plan_batches
from .config import FULL_PRECISION_DTYPES, GPTQ_MODES
from .instructions import format_query, task_instruction
from .loading import LoadedModel
from .pooling import l2_normalize, last_token_pool
from .prefix_cache import (
    PrefixState,
    PrefixStore,
    RowPrefixes,
    compute_prefix_state,
    reading_cache,
    shared_prefix_ids,
    split_rows,
)
from .tokenization import SpecialIds, TokenizedTexts, pad_rows, tokenize

log = logging.getLogger(__name__)


@dataclass
class EncodeStats:
    n_texts: int = 0
    n_truncated: int = 0
    truncated: list[int] = field(default_factory=list)  # indices into the texts of that call
    real_tokens: int = 0
    padded_tokens: int = 0
    n_batches: int = 0
    oom_retries: int = 0
    prefix_reused_tokens: int = 0  # instruction tokens not run again thanks to the prefix cache

    def merge(self, other: EncodeStats, offset: int = 0, rows: list[int] | None = None) -> None:
        """Add other's counts; its truncated indices move to this call's: by offset (a contiguous slice of the
        texts) or through rows (other's text j is this call's text rows[j])."""
        self.n_texts += other.n_texts
        self.n_truncated += other.n_truncated
        self.truncated = sorted(self.truncated + [rows[i] if rows is not None else offset + i for i in other.truncated])
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        self.n_batches += other.n_batches
        self.oom_retries += other.oom_retries
        self.prefix_reused_tokens += other.prefix_reused_tokens


def resolve_instruction(task: str | None, instruction: str | None) -> str:
    if task and instruction:
        raise InputError("give a task name or a free-text instruction, not both")
    if instruction is not None:
        return instruction
    if task is None:
        raise InputError("queries need a task name or an instruction")
    return task_instruction(task)


class Embedder:
    """Encodes texts with a loaded model; keeps the (possibly lowered) token budget between calls."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.special = SpecialIds.from_tokenizer(loaded.tokenizer)
        self.token_budget = self.config.token_budget
        self.adapters = AdapterSet(loaded.model, base_is_quantized=self.config.quant not in FULL_PRECISION_DTYPES)
        # peft routes rows of one batch to their adapters (adapter_names) on plain and bitsandbytes layers only
        self.routes_rows_to_adapters = self.config.quant not in GPTQ_MODES
        self.prefixes = PrefixStore()
        self.plan = plan_batches  # (lengths, token_budget) -> batches of indices
        # A fast tokenizer may refuse concurrent calls ("Already borrowed"): the server tokenises on request threads
        # while the model thread tokenises instruction prefixes.
        self._tokenizer_lock = threading.Lock()

    @property
    def model(self) -> torch.nn.Module:
        """The model that runs: the loaded base, or the peft wrapper once an adapter is loaded."""
        return self.adapters.model

    def load_adapter(self, name: str, folder) -> AdapterInfo:
        return self.adapters.load(name, folder)

    @property
    def dim(self) -> int:
        return self.loaded.hidden_size

    # --- public API ---------------------------------------------------------------------------
    def encode_queries(self, texts: list[str], task: str | None = None, instruction: str | None = None,
                       **kwargs) -> np.ndarray:
        return self.encode(texts, query=True, task=task, instruction=instruction, **kwargs)[0]

    def encode_documents(self, texts: list[str], **kwargs) -> np.ndarray:
        return self.encode(texts, **kwargs)[0]

    def encode(
        self,
        texts: list[str],
        *,
        query: bool = False,
        task: str | None = None,
        instruction: str | None = None,
        adapter: str | list[str | None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, EncodeStats]:
        """Embeddings (n, hidden) float32 with unit rows, in input order, and what it took.

        adapter: None for the base model, a loaded adapter's name, or one entry per text (mixed batch).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), EncodeStats()
        tok = self.tokenize(texts, query=query, task=task, instruction=instruction)
        inst = resolve_instruction(task, instruction) if (query or task or instruction) else None
        return self.encode_tokenized(tok, instruction=inst, adapter=adapter, on_batch=on_batch)

    def encode_tokenized(
        self,
        tok: TokenizedTexts,
        *,
        instruction: str | list[str | None] | None = None,
        adapter: str | list[str | None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, EncodeStats]:
        """`encode` of rows from `tokenize`. instruction: the queries' instruction (already in their rows; it lets
        them share its cached prefix), None for documents, or one per row (a server's batch mixes them, and its
        adapters: rows of any instruction and adapter share forward batches, each reading its own prefix)."""
        n = len(tok.rows)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32), EncodeStats()
        instructions = list(instruction) if isinstance(instruction, (list, tuple)) else [instruction] * n
        if len(instructions) != n:
            raise InputError(f"instruction list has {len(instructions)} entries for {n} texts; expected one per text")
        if isinstance(adapter, (list, tuple)) and len(set(adapter)) > 1 and not self.routes_rows_to_adapters:
            return self._encode_per_adapter(tok, instructions, list(adapter), on_batch)
        row_adapters = self._select_adapters(adapter, n)
        lengths = tok.lengths
        out = np.empty((n, self.dim), dtype=np.float32)
        stats = EncodeStats(n_texts=n, n_truncated=len(tok.truncated), truncated=list(tok.truncated),
                            real_tokens=sum(lengths))
        # Queries share their instruction's prefix: rows that start with it run only their own tokens.
        rows, row_prefix = list(tok.rows), [None] * n
        if self.config.cache_query_prefix:
            for inst in dict.fromkeys(i for i in instructions if i is not None):
                with self._tokenizer_lock:
                    prefix_ids = shared_prefix_ids(self.loaded.tokenizer, self.special, inst)
                members = [i for i in range(n) if instructions[i] == inst]
                states: dict[str | None, PrefixState] = {}  # by row adapter: one store lookup each per call
                for i, suffix in zip(members, split_rows([tok.rows[i] for i in members], prefix_ids)):
                    if suffix is not None:
                        a = row_adapters[i] if row_adapters else None
                        if a not in states:
                            states[a] = self._prefix_state(prefix_ids, a)
                        row_prefix[i], rows[i] = states[a], suffix
        queue = deque()  # (batch, whether it runs against cached prefixes); batches never mix the two
        for cached in (True, False):
            group = [i for i in range(n) if (row_prefix[i] is not None) == cached]
            if group:
                queue.extend((b, cached) for b in plan_batches_subset(group, lengths, self.token_budget, self.plan))
        while queue:
            batch, cached = queue.popleft()
            try:
                names = [row_adapters[i] for i in batch] if row_adapters is not None else None
                vectors = self._forward([rows[i] for i in batch], names,
                                        [row_prefix[i] for i in batch] if cached else None)
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    raise OutOfMemoryError(
                        f"text #{batch[0]} ({lengths[batch[0]]} tokens) does not fit on {self.loaded.device} even alone; "
                        "lower max_length or use a smaller quantisation"
                    ) from None
                self._release_memory()
                self.token_budget = max(1, min(self.token_budget, padded_tokens(batch, lengths)) // 2)
                stats.oom_retries += 1
                log.warning("out of memory on a batch of %d rows; token budget halved to %d", len(batch), self.token_budget)
                queue.extendleft(reversed([(b, cached) for b in
                                           plan_batches_subset(batch, lengths, self.token_budget, self.plan)]))
                continue
            out[batch] = vectors
            stats.n_batches += 1
            stats.padded_tokens += padded_tokens(batch, lengths)
            if cached:
                stats.prefix_reused_tokens += sum(row_prefix[i].length for i in batch)
            if on_batch is not None:
                on_batch(len(batch))
        return out, stats

    def tokenize(self, texts: list[str], *, query: bool = False, task: str | None = None,
                 instruction: str | None = None, truncate: bool | None = None) -> TokenizedTexts:
        """Check, format (instruction for queries) and tokenise: rows are [BOS] + content + [EOS].

        truncate: None follows the config; False refuses a text over max_length (TextTooLongError). Thread-safe.
        """
        if isinstance(texts, str):
            raise InputError("texts must be a list of strings, got one string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text #{i} is {type(t).__name__}; expected a string")
            if not t.strip():
                raise InputError(f"text #{i} is empty or whitespace only; expected some text to embed")
        if query or task or instruction:
            inst = resolve_instruction(task, instruction)
            texts = [format_query(t, inst) for t in texts]
        truncate = self.config.truncate if truncate is None else truncate
        with self._tokenizer_lock:
            return tokenize(self.loaded.tokenizer, list(texts), self.config.max_length, truncate)

    # --- internals ----------------------------------------------------------------------------
    def _encode_per_adapter(self, tok: TokenizedTexts, instructions: list, adapters: list, on_batch):
        """A mixed-adapter call on a base whose LoRA layers cannot route rows (peft's GPTQ layer takes no
        adapter_names): one call per adapter over its rows, results in input order."""
        if len(adapters) != len(tok.rows):
            raise InputError(f"adapter list has {len(adapters)} entries for {len(tok.rows)} texts; expected one per text")
        out = np.empty((len(tok.rows), self.dim), dtype=np.float32)
        stats, truncated = EncodeStats(), set(tok.truncated)
        for name in dict.fromkeys(adapters):
            idx = [i for i, a in enumerate(adapters) if a == name]
            sub = TokenizedTexts(rows=[tok.rows[i] for i in idx],
                                 truncated=[j for j, i in enumerate(idx) if i in truncated])
            vectors, s = self.encode_tokenized(sub, instruction=[instructions[i] for i in idx], adapter=name,
                                               on_batch=on_batch)
            out[idx] = vectors
            stats.merge(s, rows=idx)
        return out, stats

    def _select_adapters(self, adapter, n: int) -> list[str] | None:
        """Set the adapter state for this call; returns per-row names for a mixed batch, else None."""
        if isinstance(adapter, (list, tuple)):
            if len(adapter) != n:
                raise InputError(f"adapter list has {len(adapter)} entries for {n} texts; expected one per text")
            names = [BASE if a is None else a for a in adapter]
            for a in set(names) - {BASE}:
                self.adapters.info(a)  # unknown names fail here, listing the loaded ones
            if len(set(names)) == 1:  # one adapter (or the base) for every row: no per-row routing needed
                adapter = names[0]
            else:
                self.adapters.activate(next(a for a in names if a != BASE))  # adapter layers on; rows pick theirs
                return names
        if adapter is None or adapter == BASE:
            self.adapters.deactivate()
        else:
            self.adapters.activate(adapter)
        return None

    def _prefix_state(self, prefix_ids: tuple[int, ...], row_adapter: str | None = None) -> PrefixState:
        """The prefix's keys/values, computed on first use: under the current adapter state, or in a mixed-adapter
        call under the row's adapter (BASE: the base model)."""
        device = self.loaded.device
        if row_adapter is None:
            key = (prefix_ids, self.adapters.active, self.adapters.version)
            return self.prefixes.get(key, lambda: compute_prefix_state(self.model, prefix_ids, device))
        key = (prefix_ids, None if row_adapter == BASE else row_adapter, self.adapters.version)
        return self.prefixes.get(key, lambda: compute_prefix_state(self.model, prefix_ids, device, row_adapter))

    def _forward(self, rows: list[list[int]], adapter_names: list[str] | None = None,
                 prefixes: list[PrefixState] | None = None) -> np.ndarray:
        """Unit vectors of whole rows, or of rows that continue cached prefixes, one per row (rows then hold only
        the rest)."""
        ids, mask, positions = pad_rows(rows, self.special.pad, self.config.padding_side)  # each (B, T)
        device = self.loaded.device
        extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
        full_mask = mask
        if prefixes is not None:
            cached = RowPrefixes.of_rows(prefixes)
            full_mask, positions = cached.batch_inputs(mask, positions)  # (B, P + T), (B, T)
            extra.update(cache=reading_cache(cached), use_cache=True)
        else:
            extra["use_cache"] = False
        with torch.inference_mode():
            hidden = self.model(
                input_ids=ids.to(device), attention_mask=full_mask.to(device), position_ids=positions.to(device),
                **extra,
            ).last_hidden_state  # (B, T, H)
            pooled = l2_normalize(last_token_pool(hidden, mask))  # (B, H) fp32
        if not bool(torch.isfinite(pooled).all()):
            raise FloatingPointError(
                f"non-finite embeddings from model {self.loaded.source!r} in mode {self.config.quant!r}; "
                "try compute_dtype=float32 or bfloat16"
            )
        return pooled.cpu().numpy()

    def _release_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def plan_batches_subset(batch: list[int], lengths: list[int], token_budget: int,
                        plan=plan_batches) -> list[list[int]]:
    """Plan batches over some of the texts (a group, or the rows of a failed batch); indices stay global."""
    sub = plan([lengths[i] for i in batch], token_budget)
    return [[batch[j] for j in b] for b in sub]
