"""gptq4: calibrated 4-bit weights (GPTQ, group-wise scales and zeros) through transformers' GPTQConfig, which runs
optimum's GPTQQuantizer on the gptqmodel backend (the optional extra `[gptq]`).

The calibration rows are the calibration set's tuning split exactly as the model reads it: queries with their task
instruction, documents bare, each tokenised as BOS + content + EOS (runtime/tokenization); never the held-out split,
on which drift is measured.
"""

from __future__ import annotations

from ..errors import LowmemError
from ..quiet_imports import import_keeping_environment
from .config import RuntimeConfig

GPTQ_EXTRA = "pip install 'lowmem-e5[gptq]'"
CALIBRATION_MAX_TOKENS = 512


def require_gptq() -> None:
    """Import gptqmodel and optimum's GPTQ once, undoing what gptqmodel's import does to the process
    (quiet_imports.import_keeping_environment)."""
    try:
        import_keeping_environment("gptqmodel", "optimum.gptq")
    except ImportError as exc:
        raise LowmemError(f"quant='gptq4' needs optimum and gptqmodel ({exc.name} is missing); install the extra: "
                          f"{GPTQ_EXTRA}") from None


def calibration_rows(tokenizer, max_tokens: int = CALIBRATION_MAX_TOKENS) -> list[dict]:
    """The tuning split, pre-tokenised as optimum takes it: one {"input_ids", "attention_mask"} batch per text."""
    from .calibration_set import load_calibration_set
    from .tokenization import tokenize

    texts = load_calibration_set().select("tune").model_texts()
    rows = tokenize(tokenizer, texts, max_length=max_tokens).rows
    return [{"input_ids": [list(r)], "attention_mask": [[1] * len(r)]} for r in rows]


def gptq_config(config: RuntimeConfig, tokenizer):
    from transformers import GPTQConfig

    require_gptq()
    if tokenizer is None:
        raise ValueError("gptq4 quantises at load from calibration rows: pass the model's tokenizer")
    return GPTQConfig(bits=4, group_size=config.group_size, desc_act=False, sym=True, dataset=calibration_rows(tokenizer),
                      tokenizer=tokenizer, block_name_to_quantize="layers")


def is_gptq_module(module) -> bool:
    return type(module).__module__.startswith("gptqmodel.")


def group_size_problem(model_config, group_size: int) -> str | None:
    """Why this model cannot take gptq4 at this group size, or None: gptqmodel's kernels (the CPU one here) need every
    quantised Linear's input width to be a multiple of the group size (found on the default small model: hidden
    576 with group 128 quantises, then fails at the first forward)."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    widths = {"hidden_size": model_config.hidden_size, "intermediate_size": model_config.intermediate_size,
              "attention width (heads x head_dim)": heads * head_dim}
    bad = [f"{name} {w}" for name, w in widths.items() if w % group_size]
    if not bad:
        return None
    fits = [g for g in (256, 128, 64, 32) if all(w % g == 0 for w in widths.values())]
    return (f"group_size={group_size} does not divide this model's {', '.join(bad)}; gptqmodel's kernels need it"
            + (f": use --group-size {fits[0]}" if fits else ""))


def model_group_size_problem(model: str, group_size: int) -> str | None:
    """group_size_problem for a model name (folder or hub id), from its config alone: checked before the minutes of
    calibration, by loading and by compare's grid."""
    from transformers import AutoConfig

    from .sources import resolve_model_source

    source, local = resolve_model_source(model)
    return group_size_problem(AutoConfig.from_pretrained(source, local_files_only=local), group_size)
