"""Contrastive LoRA fine-tuning, the E5 recipe: (query, document) pairs, in-batch negatives (InfoNCE), last-token
pooling, queries with their instruction and documents bare, exactly as `encode` makes them.

The base is full precision or quantised (QLoRA: peft on bitsandbytes' 4-bit layers, loaded through
`runtime.loading`, which keeps bitsandbytes' CPU layout stable so LoRA gradients are not silently zero). The result
is an ordinary peft folder that `encode --adapter`, `Embedder.load_adapter` and the server load. Training saves a
checkpoint every few steps beside the output and resumes from it when run again with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import InputError, ResumeMismatchError
from ..jobs.inputs import parse_jsonl_line, read_lines
from ..runtime.config import RuntimeConfig
from ..runtime.encoder import Embedder, resolve_instruction
from ..runtime.loading import load_model
from ..runtime.pooling import last_token_pool
from ..runtime.tokenization import pad_rows
from .repair import ALL_PROJECTIONS

STATE_FILE = "finetune_state.pt"
RECORD_FILE = "finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ALL_PROJECTIONS
    epochs: int = 1
    batch_size: int = 32  # pairs per step: each query's negatives are the other 31 documents (and hard negatives)
    lr: float = 2e-3
    temperature: float = 0.02  # the E5 paper's
    max_length: int = 256  # tokens per training text (with BOS and EOS)
    warmup: float = 0.1  # share of steps with a rising lr, then linear decay to 0
    checkpoint_every: int = 8  # steps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ValueError(f"rank={self.rank}, alpha={self.alpha} are not valid; expected integers >= 1")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size} are not valid; expected epochs >= 1 "
                             "and batch_size >= 2 (in-batch negatives need a second pair)")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError(f"lr={self.lr}, temperature={self.temperature} are not valid; expected both > 0")
        if not 0 <= self.warmup < 1 or self.checkpoint_every < 1 or self.max_length < 3:
            raise ValueError("expected 0 <= warmup < 1, checkpoint_every >= 1 and max_length >= 3")


@dataclass(frozen=True)
class Pair:
    query: str
    document: str
    negative: str | None = None
    instruction: str | None = None  # this pair's query instruction; None: the run's --task / --instruction


def read_pairs(path: str | Path) -> list[Pair]:
    """A .jsonl of {"query": ..., "document": ..., optional "negative": ...} objects."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs file {str(path)!r} does not exist; expected a .jsonl of query/document pairs")
    pairs = []
    for number, line in read_lines(path):
        if not line.strip():
            continue
        row = parse_jsonl_line(path, number, line)
        for field in ("query", "document", "negative"):
            value = row.get(field)
            if field == "negative" and value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                got = "missing" if value is None else "empty" if isinstance(value, str) else type(value).__name__
                raise InputError(f"{path} line {number}: {field!r} is {got}; expected a non-empty string")
        pairs.append(Pair(row["query"], row["document"], row.get("negative")))
    if len(pairs) < 2:
        raise InputError(f"{path} has {len(pairs)} pairs; expected at least 2 (in-batch negatives)")
    return pairs


def pairs_from_beir(split, instruction: str | None = None) -> list[Pair]:
    """One pair per relevant (score > 0) judgement of a BEIR split; instruction: its queries' (several folders,
    several tasks, as E5 trains)."""
    text_of_doc = dict(zip(split.doc_ids, split.doc_texts))
    text_of_query = dict(zip(split.query_ids, split.query_texts))
    return [Pair(text_of_query[q], text_of_doc[d], instruction=instruction) for q in split.query_ids
            for d, rel in split.qrels[q].items() if rel > 0]


def pairs_sha256(pairs: list[Pair]) -> str:
    return hashlib.sha256(json.dumps([asdict(p) for p in pairs]).encode()).hexdigest()


def info_nce(queries: torch.Tensor, documents: torch.Tensor, temperature: float) -> torch.Tensor:
    """queries (B, H), documents (B + N, H), unit rows; query i's positive is document i, every other document
    (the batch's and any hard negatives) a negative."""
    logits = queries @ documents.T / temperature
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def _embed(model, rows: list[list[int]], pad: int, device: str) -> torch.Tensor:
    ids, mask, pos = pad_rows(rows, pad, "right")
    hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   use_cache=False).last_hidden_state
    return torch.nn.functional.normalize(last_token_pool(hidden, mask.to(device)).float(), dim=-1)


def query_rows(embedder: Embedder, pairs: list[Pair], instruction: str | None) -> list[list[int]]:
    """Each pair's query as `encode` tokenises it: with its own instruction, else the run's."""
    rows: list = [None] * len(pairs)
    for this in dict.fromkeys(p.instruction or instruction for p in pairs):
        members = [i for i, p in enumerate(pairs) if (p.instruction or instruction) == this]
        for i, row in zip(members, embedder.tokenize([pairs[i].query for i in members], query=True,
                                                     instruction=this).rows):
            rows[i] = row
    return rows


def epoch_batches(pairs: list[Pair], batch_size: int, seed: int) -> list[list[int]]:
    """One epoch's batches: each from one instruction (task), so in-batch negatives are documents of the same kind,
    not trivially told apart; a task's last partial batch is dropped; batch order shuffled. Deterministic."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for this in dict.fromkeys(p.instruction for p in pairs):
        members = [i for i, p in enumerate(pairs) if p.instruction == this]
        order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        batches += [order[k:k + batch_size] for k in range(0, len(order) - batch_size + 1, batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def _lr_lambda(total: int, warmup: float):
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
    return factor


def train_adapter(config: RuntimeConfig, pairs: list[Pair], fc: FinetuneConfig, output: Path, *,
                  task: str | None = None, instruction: str | None = None, progress: bool = True,
                  restart: bool = False, stop_after: int | None = None, gradient_checkpointing: bool = True) -> dict:
    """Train a LoRA on the pairs and save it to `output` (atomically). A checkpoint folder `output`.partial keeps
    the adapter and optimizer every fc.checkpoint_every steps; the same call resumes from it. stop_after: stop after
    that many steps in this call (tests; a stopped run resumes). gradient_checkpointing: keep only each layer's input
    for the backward pass and recompute the rest (the same numbers; a batch of 32 x 128 tokens on the 135M model
    otherwise held over 24 GB on the CPU and was killed), at about a third more compute."""
    from ..quiet_imports import import_peft

    import_peft()  # before any peft use: it would import gptqmodel (extra [gptq]) even for a bitsandbytes base
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    output = Path(output)
    inst = resolve_instruction(task, instruction) if (task or instruction) else None
    if inst is None and any(p.instruction is None for p in pairs):
        raise InputError("pairs without their own instruction need --task or --instruction")
    if output.exists():
        raise InputError(f"output {str(output)!r} exists; expected a new adapter folder name")
    partial = output.with_name(output.name + ".partial")
    identity = {"finetune": asdict(fc), "base": config.replace(max_length=fc.max_length).to_dict(),
                "instruction": inst, "pairs_sha256": pairs_sha256(pairs), "pairs": len(pairs)}
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    state = None
    if partial.exists() and not restart:
        stored = json.loads((partial / "identity.json").read_text()) if (partial / "identity.json").is_file() else {}
        changed = sorted(k for k in identity if stored.get(k) != identity[k])
        if changed:
            raise ResumeMismatchError(f"{partial} holds a run with other {', '.join(changed)}; pass --restart to "
                                      "start over, or the same settings to resume")
        if (partial / STATE_FILE).is_file():
            state = torch.load(partial / STATE_FILE, weights_only=True)
    elif partial.exists():
        shutil.rmtree(partial)

    torch.manual_seed(fc.seed)
    embedder = Embedder(load_model(config.replace(max_length=fc.max_length)))
    base = embedder.loaded.model
    if isinstance(base, PeftModel):
        raise InputError("the base already carries adapters; finetune starts from a bare base")
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=fc.rank, lora_alpha=fc.alpha, lora_dropout=0.0,
                                            target_modules=list(fc.targets)))
    queries = query_rows(embedder, pairs, inst)
    documents = embedder.tokenize([p.document for p in pairs]).rows
    negatives = {i: r for i, r in zip([i for i, p in enumerate(pairs) if p.negative],
                                      embedder.tokenize([p.negative for p in pairs if p.negative]).rows)} \
        if any(p.negative for p in pairs) else {}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=fc.lr, weight_decay=0.0)
    steps_per_epoch = len(epoch_batches(pairs, fc.batch_size, fc.seed))
    if steps_per_epoch == 0:
        raise InputError(f"no task has {fc.batch_size} pairs; lower --batch-size (a batch's negatives come from "
                         "one task)")
    total = fc.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, fc.warmup))
    losses: list[float] = []
    seconds = 0.0
    if state is not None:
        set_peft_model_state_dict(model, load_file(str(partial / "adapter" / "adapter_model.safetensors")))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        losses, seconds = [float(x) for x in state["losses"]], float(state["seconds"])
    device, pad = embedder.loaded.device, embedder.special.pad
    model.train()
    bar = tqdm(total=total, initial=len(losses), desc="finetune", unit="step", disable=not progress)
    t0 = time.perf_counter()
    done_here = 0
    first_step = len(losses)  # > 0 when resumed
    for step in range(first_step, total):
        epoch, k = divmod(step, steps_per_epoch)
        if k == 0 or step == first_step:
            batches = epoch_batches(pairs, fc.batch_size, fc.seed + epoch)
        idx = batches[k]
        q = _embed(model, [queries[i] for i in idx], pad, device)
        doc_rows = [documents[i] for i in idx] + [negatives[i] for i in idx if i in negatives]
        d = _embed(model, doc_rows, pad, device)
        loss = info_nce(q, d, fc.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        done_here += 1
        finished = len(losses) == total
        if finished or len(losses) % fc.checkpoint_every == 0 or done_here == stop_after:
            _save_checkpoint(model, opt, sched, losses, seconds + time.perf_counter() - t0, identity, partial)
        if done_here == stop_after and not finished:
            bar.close()
            return {"stopped_at_step": len(losses), "total_steps": total}
    bar.close()
    model.eval()
    seconds += time.perf_counter() - t0
    record = {**identity, "steps": total, "steps_per_epoch": steps_per_epoch, "losses": losses,
              "chance_loss": math.log(fc.batch_size),  # uniform over the batch's documents (hard negatives add more)
              "first_loss": losses[0], "last_epoch_loss": float(np.mean(losses[-steps_per_epoch:])),
              "train_seconds": seconds, "adapter_bytes": sum(p.numel() * p.element_size() for p in params)}
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    return record


def _save_checkpoint(model, opt, sched, losses, seconds, identity, partial: Path) -> None:
    """Adapter + optimizer + losses into `partial`, replaced as a whole (temp sibling, rename)."""
    tmp = Path(tempfile.mkdtemp(dir=partial.parent, prefix=f".{partial.name}."))
    try:
        model.save_pretrained(tmp / "adapter")
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "losses": losses,
                    "seconds": seconds}, tmp / STATE_FILE)
        (tmp / "identity.json").write_text(json.dumps(identity, indent=2))
        old = partial.with_name(partial.name + ".old")
        if partial.exists():
            os.replace(partial, old)
        os.replace(tmp, partial)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
