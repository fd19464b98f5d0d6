"""Tokenisation that guarantees the E5 row shape: BOS first, EOS last, whatever the tokenizer does.

The E5-Mistral tokenizer config says add_eos_token=true but its tokenizer.json post-processor adds only BOS,
and transformers >= 5 follows tokenizer.json: the EOS silently disappears and last-token pooling reads a
content token. We therefore tokenise without special tokens and add BOS and EOS ourselves, exactly as the
official code does (truncate the content, then append EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TextTooLongError


@dataclass(frozen=True)
class TokenizedTexts:
    rows: list[list[int]]  # one row per text: [BOS] + content + [EOS]
    truncated: list[int]  # indices of texts whose content was cut to fit max_length

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.rows]


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialIds:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; E5 pooling needs one")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(bos=tokenizer.bos_token_id, eos=eos, pad=pad)


def tokenize(tokenizer, texts: list[str], max_length: int, truncate: bool = True) -> TokenizedTexts:
    special = SpecialIds.from_tokenizer(tokenizer)
    n_special = 2 if special.bos is not None else 1
    content_budget = max_length - n_special
    # add_special_tokens=False: the tokenizer's own BOS/EOS policy (which differs between versions) is ignored.
    contents = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    rows: list[list[int]] = []
    truncated: list[int] = []
    for i, content in enumerate(contents):
        if len(content) > content_budget:
            if not truncate:
                raise TextTooLongError(i, len(content) + n_special, max_length)
            truncated.append(i)
            content = content[:content_budget]
        head = [special.bos] if special.bos is not None else []
        rows.append(head + list(content) + [special.eos])
    return TokenizedTexts(rows=rows, truncated=truncated)


def pad_rows(
    rows: list[list[int]], pad_id: int, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to a rectangle; returns input_ids, attention_mask and position_ids, each (B, T).

    Positions are counted over real tokens only, so a left-padded row sees the same rotary positions
    as the same row alone (transformers would otherwise number the pads too).
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if padding_side == "left":
            ids[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
        else:
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T), 0 at the first real token
    return ids, mask, positions
