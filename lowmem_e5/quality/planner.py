"""Memory planner: exact weight bytes of a model architecture in each mode, counted on the meta device, and the
largest token budget per batch that fits beside them on a card.

Weight bytes follow bitsandbytes' storage exactly (the test suite checks them against loaded models byte for byte):
- int8 Linear: 1 byte per weight + one fp32 scale per output row;
- 4-bit Linear: half a byte per weight + a 16-entry fp32 codebook + per 64-weight block an fp32 absmax, or with
  double quantisation a uint8 absmax + per 256 blocks an fp32 absmax + a 256-entry fp32 codebook + an fp32 offset;
- everything else (token embedding, norms) in the compute dtype: 16-bit on GPU, 32-bit on CPU.

Activation bytes per padded token are an estimate, stated here so it can be checked (scripts/gpu_check.sh measures
it on a GPU): the residual stream and one MLP's gate, up and product live at once, (2*hidden + 3*intermediate)
values in the compute dtype, plus for 4-bit modes one dequantised weight matrix as workspace; attention is assumed
to run in SDPA's memory-efficient kernel (memory linear in sequence length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CARDS_GIB = (6, 8, 12, 16)
DEFAULT_RESERVE = 768 << 20  # CUDA context + allocator slack, bytes


def e5_mistral_config():
    """The published config of intfloat/e5-mistral-7b-instruct."""
    from transformers import MistralConfig

    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)


def meta_model(config) -> torch.nn.Module:
    from transformers import MistralModel

    with torch.device("meta"):
        return MistralModel(config)


GPTQ_KERNEL_TABLE_BYTES = 32  # gptqmodel's CPU kernel (TorchAtenLinear): an int32 (1, 1, 8) unpacking table per layer


def linear_bytes(out_features: int, in_features: int, fmt: str, double_quant: bool, full_dtype_bytes: int,
                 group_size: int = 128) -> int:
    n = out_features * in_features
    if fmt == "gptq4":  # int32-packed weights, per group fp16 scales and int32-packed zeros, an int32 g_idx per column
        groups = math.ceil(in_features / group_size)
        return (n // 2 + groups * math.ceil(out_features / 8) * 4 + groups * out_features * 2 + in_features * 4
                + GPTQ_KERNEL_TABLE_BYTES)
    if fmt == "full":
        return n * full_dtype_bytes
    if fmt == "int8":
        return n + out_features * 4
    if fmt in ("nf4", "fp4"):
        blocks = math.ceil(n / 64)
        constants = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 if double_quant else blocks * 4
        return math.ceil(n / 2) + 16 * 4 + constants
    raise ValueError(f"format {fmt!r} is not valid; expected one of: full, int8, nf4, fp4, gptq4")


@dataclass(frozen=True)
class WeightPlan:
    mode: str
    total: int
    linear: int
    other: int
    largest_linear: int  # weights of the biggest Linear, for the 4-bit dequantisation workspace


def plan_weights(model: torch.nn.Module, quant: str, double_quant: bool = False, compute_dtype: str = "float16",
                 overrides: dict[str, str] | None = None, group_size: int = 128) -> WeightPlan:
    """Bytes of model's weights when loaded with this mode; overrides: module name -> format for single Linears."""
    overrides = overrides or {}
    full = DTYPE_BYTES[compute_dtype]
    base = "full" if quant in ("fp32", "fp16", "bf16") else quant
    if base == "full":
        full = {"fp32": 4, "fp16": 2, "bf16": 2}[quant]
    linear = other = largest = 0
    linear_params: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            linear += linear_bytes(out_f, in_f, overrides.get(name, base), double_quant, full, group_size)
            largest = max(largest, out_f * in_f)
            linear_params.add(id(module.weight))
            if module.bias is not None:
                linear_params.add(id(module.bias))
                other += module.bias.numel() * full
    embed_fmt = overrides.get("embed_tokens")
    embedding = model.get_submodule("embed_tokens") if embed_fmt else None
    for p in model.parameters():
        if embedding is not None and p is embedding.weight:
            v, h = p.shape  # bitsandbytes' embeddings: int8 rows + fp32 row scales, or nf4 without double quant
            other += linear_bytes(v, h, embed_fmt, double_quant=False, full_dtype_bytes=full)
        elif id(p) not in linear_params:
            other += p.numel() * full
    label = f"{quant}+dq" if double_quant else f"{quant}-g{group_size}" if quant == "gptq4" else quant
    return WeightPlan(mode=label, total=linear + other, linear=linear, other=other, largest_linear=largest)


def activation_bytes_per_token(config, compute_dtype: str) -> int:
    return (2 * config.hidden_size + 3 * config.intermediate_size) * DTYPE_BYTES[compute_dtype]


def workspace_bytes(weights: WeightPlan, compute_dtype: str) -> int:
    """One dequantised weight matrix for 4-bit modes."""
    base_mode = weights.mode.split("+")[0].split("-")[0]  # "nf4+dq" -> nf4, "gptq4-g128" -> gptq4
    return weights.largest_linear * DTYPE_BYTES[compute_dtype] if base_mode in ("nf4", "fp4", "gptq4") else 0


def max_token_budget(card_bytes: int, weights: WeightPlan, config, compute_dtype: str,
                     reserve: int = DEFAULT_RESERVE) -> int:
    """Largest padded tokens per batch that fit beside the weights (0: the weights alone do not fit)."""
    free = card_bytes - weights.total - reserve - workspace_bytes(weights, compute_dtype)
    return max(0, free // activation_bytes_per_token(config, compute_dtype))


def replica_bytes(weights: WeightPlan, config, compute_dtype: str, token_budget: int,
                  reserve: int = DEFAULT_RESERVE) -> int:
    """GPU bytes one model replica (one process) needs at this token budget: weights, workspace, activations and
    its own CUDA context."""
    return (weights.total + workspace_bytes(weights, compute_dtype) + reserve
            + token_budget * activation_bytes_per_token(config, compute_dtype))


def replicas_table(config, gpus: dict[str, int], token_budget: int, compute_dtype: str = "float16",
                   reserve: int = DEFAULT_RESERVE) -> list[dict]:
    """Per mode: bytes of one replica, and how many fit each GPU (label -> bytes)."""
    model = meta_model(config)
    rows = []
    for quant, dq, group in PLAN_MODES:
        weights = plan_weights(model, quant, dq, compute_dtype, group_size=group)
        need = replica_bytes(weights, config, compute_dtype, token_budget, reserve)
        rows.append({"mode": weights.mode, "replica_bytes": need, "token_budget": token_budget,
                     "replicas": {label: size // need for label, size in gpus.items()}})
    return rows


PLAN_MODES = [("fp16", False, 128), ("bf16", False, 128), ("int8", False, 128), ("nf4", False, 128), ("nf4", True, 128),
              ("fp4", False, 128), ("fp4", True, 128), ("gptq4", False, 128), ("gptq4", False, 64)]


def card_sizes(cards_gib=CARDS_GIB) -> dict[str, int]:
    return {f"{g}GiB": g * GIB for g in cards_gib}


def plan_table(config, cards: dict[str, int] | None = None, compute_dtype: str = "float16",
               reserve: int = DEFAULT_RESERVE) -> list[dict]:
    """Per mode: weight bytes and, per card (label -> bytes), the largest token budget beside them."""
    cards = card_sizes() if cards is None else cards
    model = meta_model(config)
    rows = []
    for quant, dq, group in PLAN_MODES:
        w = plan_weights(model, quant, dq, compute_dtype, group_size=group)
        rows.append({"mode": w.mode, "weight_bytes": w.total, "linear_bytes": w.linear, "other_bytes": w.other,
                     "max_token_budget": {label: max_token_budget(size, w, config, compute_dtype, reserve)
                                          for label, size in cards.items()}})
    return rows


def format_plan(rows: list[dict], card_labels: list[str] | None = None) -> str:
    card_labels = list(card_sizes()) if card_labels is None else card_labels
    head = "| mode | weight bytes | GiB | " + " | ".join(
        f"{label.removesuffix('GiB')} GiB card: tokens/batch" for label in card_labels) + " |"
    lines = [head, "|" + "---|" * (3 + len(card_labels))]
    for r in rows:
        fits = [f"{r['max_token_budget'][label]:,}" if r["max_token_budget"][label] else "does not fit"
                for label in card_labels]
        lines.append(f"| {r['mode']} | {r['weight_bytes']:,} | {r['weight_bytes'] / GIB:.2f} | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def index_table(config, documents: int, weight_rows: list[dict]) -> list[dict]:
    """Per stored vector format: bytes per vector (the model's hidden size), the index of `documents` vectors, and
    weights + index for each weight mode of `plan_table`."""
    from ..runtime.vector_formats import FORMATS, VectorFormat

    d = config.hidden_size
    rows = []
    for name in FORMATS:
        per = VectorFormat(name).bytes_per_vector(d)
        rows.append({"format": name, "dimensions": d, "bytes_per_vector": per, "index_bytes": per * documents,
                     "with_weights": {w["mode"]: w["weight_bytes"] + per * documents for w in weight_rows}})
    return rows


def format_index(rows: list[dict], documents: int, modes: tuple[str, ...] = ("fp16", "int8", "nf4")) -> str:
    head = (f"| vectors ({rows[0]['dimensions']:,} dims) | bytes / vector | index of {documents:,} documents (GiB) | "
            + " | ".join(f"{m} weights + index (GiB)" for m in modes) + " |")
    lines = [head, "|" + "---|" * (3 + len(modes))]
    for r in rows:
        lines.append(f"| {r['format']} | {r['bytes_per_vector']:,} | {r['index_bytes'] / GIB:.2f} | "
                     + " | ".join(f"{r['with_weights'][m] / GIB:.2f}" for m in modes) + " |")
    return "\n".join(lines)
