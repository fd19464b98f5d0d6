"""Drift repair: train a small LoRA on the quantised base so its embeddings match the full-precision reference.

This is the distillation the E5 author recommends for 4-bit models (microsoft/unilm #1430), done QLoRA style: the
base stays in 4-bit (bitsandbytes) and frozen, peft trains low-rank adapters on every projection, the loss pulls
each calibration text's pooled embedding towards its reference vector (cosine or MSE). The result is an ordinary
adapter folder: load it with `--adapter` like any other, on the same base and mode.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from ..runtime.calibration_set import CalibrationSet
from ..runtime.config import RuntimeConfig
from ..runtime.encoder import Embedder
from ..runtime.loading import load_model
from ..runtime.pooling import last_token_pool
from ..runtime.sources import resolve_model_source
from ..runtime.tokenization import pad_rows
from .evaluation import drift_run, reference_rows
from .reference import Reference

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RepairConfig:
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ALL_PROJECTIONS
    epochs: int = 6
    batch_size: int = 8
    lr: float = 1e-3
    loss: Literal["cosine", "mse"] = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ValueError(f"rank={self.rank}, alpha={self.alpha} are not valid; expected integers >= 1")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if self.loss not in ("cosine", "mse"):
            raise ValueError(f"loss={self.loss!r} is not valid; expected one of: cosine, mse")


def train_repair_adapter(config: RuntimeConfig, reference: Reference, tune: CalibrationSet, rc: RepairConfig,
                         output: Path, progress: bool = True) -> dict:
    """Train on `tune`, save the adapter to `output` (atomically); returns the training log."""
    from ..quiet_imports import import_peft

    import_peft()  # before any peft use: it would import gptqmodel (extra [gptq]) even for a bitsandbytes base
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(rc.seed)
    config = config.replace(max_length=reference.max_length)
    reference.check_model(resolve_model_source(config.model)[0])
    embedder = Embedder(load_model(config))
    model = get_peft_model(embedder.loaded.model, LoraConfig(r=rc.rank, lora_alpha=rc.alpha, lora_dropout=0.0,
                                                             target_modules=list(rc.targets)))
    rows = embedder.tokenize(tune.model_texts()).rows  # E5 rows: [BOS] + text + [EOS]
    targets = torch.from_numpy(reference_rows(reference, tune))  # (n, H) fp32, unit norm
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rc.lr, weight_decay=0.0)
    steps_per_epoch = (len(rows) + rc.batch_size - 1) // rc.batch_size
    total_steps = rc.epochs * steps_per_epoch
    if total_steps >= 20:  # one-cycle needs >= 2 warm-up steps (10 %); shorter runs keep the lr constant
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rc.lr, total_steps=total_steps, pct_start=0.1)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    device = embedder.loaded.device
    losses = []
    gen = torch.Generator().manual_seed(rc.seed)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, desc="repair", unit="step", disable=not progress)
    for _ in range(rc.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        for start in range(0, len(order), rc.batch_size):
            idx = order[start:start + rc.batch_size]
            ids, mask, pos = pad_rows([rows[i] for i in idx], embedder.special.pad, "right")  # (B, T)
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           use_cache=False).last_hidden_state  # (B, T, H)
            pred = torch.nn.functional.normalize(last_token_pool(hidden, mask).float(), dim=-1)  # (B, H)
            target = targets[idx].to(device)
            loss = (1 - (pred * target).sum(-1)).mean() if rc.loss == "cosine" else ((pred - target) ** 2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach().item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        log = {"repair": asdict(rc), "base": config.to_dict(), "train_texts": len(rows), "steps": len(losses),
               "first_loss": losses[0], "last_epoch_loss": float(np.mean(losses[-steps_per_epoch:])),
               "seconds": seconds, "adapter_bytes": sum(p.numel() * p.element_size() for p in params)}
        (tmp / "repair.json").write_text(json.dumps(log, indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return log


def repaired_drift(config: RuntimeConfig, reference: Reference, heldout: CalibrationSet, adapter: Path) -> dict:
    """Held-out drift of the quantised base without and with the repair adapter (one base, switched)."""
    embedder = Embedder(load_model(config.replace(max_length=reference.max_length)))
    before = drift_run(config, reference, heldout, embedder=embedder)
    embedder.load_adapter("repair", adapter)
    after = drift_run(config, reference, heldout, embedder=embedder, adapter="repair", plan="repair adapter")
    return {"before": before.report.to_dict(), "after": after.report.to_dict(),
            "drift_reduction": 1 - after.report.mean_drift / before.report.mean_drift}
