"""Mixed precision: keep the modules that drift most in 8-bit or full precision under a 4-bit base, and quantise
the token embedding, which transformers leaves in 16/32-bit.

The sensitivity of each Linear is measured on the calibration tuning split: its inputs are recorded during one
full-precision forward pass, and the relative output error ||X (W - Q(W))^T|| / ||X W^T|| of its 4-bit version is
computed with bitsandbytes' own quantise/dequantise. Plans upgrade the modules with the most error per extra
byte first; each plan's real drift is then measured end to end (compare).
"""

from __future__ import annotations

from dataclasses import dataclass

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


# --- sensitivity -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSensitivity:
    name: str
    relative_error: float  # ||X (W - Q(W))^T|| / ||X W^T|| on calibration inputs
    weights: int


def linear_sensitivity(model: torch.nn.Module, batches: list[dict], quant_type: str = "nf4",
                       max_rows: int = 4096) -> list[ModuleSensitivity]:
    """model: full-precision fp32; batches: model inputs (input_ids, attention_mask, position_ids)."""
    import bitsandbytes.functional as F

    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def record(mod, args, _out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])  # (tokens, in)
                inputs.setdefault(name, []).append(x.detach().float())
            hooks.append(module.register_forward_hook(record))
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    masks = torch.cat([b["attention_mask"].reshape(-1).bool() for b in batches])  # real tokens only
    result = []
    gen = torch.Generator().manual_seed(0)
    for name, chunks in inputs.items():
        x = torch.cat(chunks)[masks]  # (real tokens, in)
        if len(x) > max_rows:
            x = x[torch.randperm(len(x), generator=gen)[:max_rows]]
        w = model.get_submodule(name).weight.data.float()
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        wq = F.dequantize_4bit(packed, state).float()
        ref = x @ w.T
        err = (x @ (w - wq).T).norm() / ref.norm()
        result.append(ModuleSensitivity(name=name, relative_error=float(err), weights=w.numel()))
    return sorted(result, key=lambda s: -s.relative_error)


def greedy_plans(sens: list[ModuleSensitivity], fractions: tuple[float, ...], fmt: str = "int8") -> list[tuple[str, ...]]:
    """Upgrade modules by error per weight until each fraction of all Linear weights is upgraded."""
    total = sum(s.weights for s in sens)
    ranked = sorted(sens, key=lambda s: -s.relative_error / s.weights)
    plans = []
    for frac in fractions:
        chosen, used = [], 0
        for s in ranked:
            if used + s.weights > frac * total:
                continue
            chosen.append(f"{s.name}={fmt}")
            used += s.weights
        plans.append(tuple(chosen))
    return plans
