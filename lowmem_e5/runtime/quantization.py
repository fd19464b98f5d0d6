"""From a quantisation mode to what transformers needs: a BitsAndBytesConfig and the dtype of the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FULL_PRECISION_DTYPES, GPTQ_MODES, RuntimeConfig

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadPlan:
    """Arguments for from_pretrained: the dtype of unquantised modules and the bitsandbytes config (or None)."""

    dtype: torch.dtype
    quantization_config: object | None  # transformers.BitsAndBytesConfig


def load_plan(config: RuntimeConfig, tokenizer=None) -> LoadPlan:
    """tokenizer: needed for gptq4, which calibrates on the calibration set's tuning split as the model reads it."""
    from transformers import BitsAndBytesConfig

    if config.quant in FULL_PRECISION_DTYPES:
        return LoadPlan(dtype=TORCH_DTYPES[FULL_PRECISION_DTYPES[config.quant]], quantization_config=None)
    compute = TORCH_DTYPES[config.resolved_compute_dtype()]
    if config.quant in GPTQ_MODES:
        from .gptq import gptq_config

        return LoadPlan(dtype=compute, quantization_config=gptq_config(config, tokenizer))
    # Linears with a per-module override skip the conversion; the loader converts them afterwards.
    skip = [name for name in config.override_map() if name != "embed_tokens"] or None
    if config.quant == "int8":
        # Norms and the token embedding stay in the compute dtype; Linear layers become Linear8bitLt.
        return LoadPlan(dtype=compute, quantization_config=BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=float(config.int8_threshold), llm_int8_skip_modules=skip))
    return LoadPlan(
        dtype=compute,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.quant,  # "nf4" or "fp4"
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=skip,
        ),
    )
