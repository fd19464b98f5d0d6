"""Last-token pooling, normalisation and fp32 cosine."""

from __future__ import annotations

import numpy as np
import torch


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, from the mask (never from token ids: pad == EOS).

    Works for left and right padding alike: it is the position of the last 1 in the row.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    if not bool((attention_mask.sum(dim=1) > 0).all()):
        raise ValueError("attention_mask has a row with no real token")
    seq_len = attention_mask.shape[1]
    from_end = attention_mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)  # (B,) distance of last 1 from the end
    return seq_len - 1 - from_end


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H): the state of each row's last real token (its EOS)."""
    idx = last_token_indices(attention_mask).to(hidden.device)  # (B,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, H)
    assert pooled.shape == (hidden.shape[0], hidden.shape[2])
    return pooled


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Normalise rows in fp32 whatever the model dtype (half-precision norms lose digits)."""
    return torch.nn.functional.normalize(x.float(), p=2, dim=-1)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of a with every row of b, computed in fp32 (or wider)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of row i of a with row i of b, in fp32."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    num = (a * b).sum(axis=-1)
    return num / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
