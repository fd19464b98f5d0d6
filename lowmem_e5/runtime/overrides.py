"""Per-module precision overrides applied after loading: chosen Linears in LLM.int8(), and the token embedding,
which transformers leaves in 16/32-bit, in int8 or nf4. Which modules to override is quality/precision_plans' job.
"""

from __future__ import annotations

import torch

from .config import EMBEDDING_MODULE


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        examples = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:3]
        raise ValueError(f"override module {name!r} is not in the model; expected names like {', '.join(examples)} "
                         f"or {EMBEDDING_MODULE!r}") from None


def _set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def to_int8_linear(linear: torch.nn.Linear, device: str, threshold: float = 6.0) -> torch.nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=threshold)  # 6.0: transformers' default
    q.weight = bnb.nn.Int8Params(linear.weight.data.float().cpu().half(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(device)  # quantises on the move to the device


def to_quantized_embedding(embedding: torch.nn.Embedding, fmt: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    v, h = embedding.weight.shape
    w = embedding.weight.data.float().cpu()
    if fmt == "int8":
        q = bnb.nn.Embedding8bit(v, h)
        q.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.EmbeddingNF4(v, h, dtype=dtype)
        # compress_statistics=False: with nested absmax, bitsandbytes 0.50's Embedding4bit lookup errs 3x more
        # than dequantising the whole table (relative error 0.31 vs 0.11 on the default model's embedding).
        q.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False)
    return q.to(device)


class _CastEmbedding(torch.nn.Module):
    """bitsandbytes embeddings return their own dtype; the decoder expects the compute dtype."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids).to(self.dtype)


def apply_overrides(model: torch.nn.Module, overrides: dict[str, str], device: str, dtype: torch.dtype,
                    int8_threshold: float = 6.0) -> None:
    """After loading (override Linears were skipped by the 4-bit conversion, so they arrive in full precision)."""
    for name, fmt in overrides.items():
        module = _module(model, name)
        if name == EMBEDDING_MODULE:
            _set_module(model, name, _CastEmbedding(to_quantized_embedding(module, fmt, device, dtype), dtype))
        elif fmt == "int8":
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"override module {name!r} is {type(module).__name__}; expected a Linear")
            _set_module(model, name, to_int8_linear(module, device, int8_threshold))
