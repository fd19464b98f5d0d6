"""Mixed precision: keep the modules that drift most in 8-bit or full precision under a 4-bit base, and quantise
the token embedding, which transformers leaves in 16/32-bit.

The sensitivity of each Linear is measured on the calibration tuning split: its inputs are recorded during one
full-precision forward pass, and the relative output error ||X (W - Q(W))^T|| / ||X W^T|| of its 4-bit version is
computed with bitsandbytes' own quantise/dequantise. Plans upgrade the modules with the most error per extra
byte first; each plan's real drift is then measured end to end (compare). The chosen plan is applied at load time
by runtime/overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
