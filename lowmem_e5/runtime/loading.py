"""The one module that calls from_pretrained on a runtime model: config in, model + tokenizer + exact weight bytes
out. Which folder or hub id a model name means is runtime/sources' job."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import ModelSourceError
from .checkpoints import read_checkpoint, verify_checkpoint
from .config import GPTQ_MODES, RuntimeConfig
from .memory import WeightBytes, release_freed_memory, weight_bytes
from .quantization import TORCH_DTYPES, LoadPlan, load_plan
from .sources import resolve_model_source


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers MistralModel (no LM head), possibly with bitsandbytes layers
    tokenizer: object
    config: RuntimeConfig
    source: str  # the folder or hub id it came from
    device: str
    weight_bytes: WeightBytes

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def load_tokenizer(source: str, local: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load the tokenizer of model {source!r}: {exc}") from exc


def load_model(config: RuntimeConfig) -> LoadedModel:
    from transformers import AutoModel

    source, local = resolve_model_source(config.model)
    device = config.resolved_device()
    tokenizer = load_tokenizer(source, local)
    checkpoint = read_checkpoint(source) if local else None
    if checkpoint is not None:  # pre-quantised by `lowmem-e5 quantize`: transformers reads its quantization_config
        verify_checkpoint(source, checkpoint, config)
        if config.quant in GPTQ_MODES:
            from .gptq import require_gptq

            require_gptq()
        plan = LoadPlan(dtype=TORCH_DTYPES[config.resolved_compute_dtype()], quantization_config=None)
    else:
        if config.quant in GPTQ_MODES:  # before the calibration pass, which takes minutes
            from .gptq import model_group_size_problem

            problem = model_group_size_problem(config.model, config.group_size)
            if problem:
                raise ModelSourceError(f"cannot quantise model {source!r} to gptq4: {problem}")
        plan = load_plan(config, tokenizer)
    try:
        # a pre-quantised folder's own quantization_config applies only when none is passed, not even None
        quantization = {"quantization_config": plan.quantization_config} if plan.quantization_config else {}
        model = AutoModel.from_pretrained(source, dtype=plan.dtype, device_map={"": device}, local_files_only=local,
                                          **quantization)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load model {source!r} with quant={config.quant!r}: {exc}") from exc
    if checkpoint is not None:
        use_runtime_dtype(model, plan.dtype)
    if config.overrides:
        from .overrides import apply_overrides

        apply_overrides(model, config.override_map(), device, plan.dtype, config.int8_threshold)
    keep_4bit_layout_stable(model)
    model.eval()
    release_freed_memory()  # the full-precision tensors read before quantising are freed but kept by the allocator
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=source, device=device,
                       weight_bytes=weight_bytes(model))


def use_runtime_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """A saved checkpoint keeps the dtypes it was quantised with (float32 when made on a CPU): transformers loads its
    unquantised weights (token embedding, norms) as stored, and its 4-bit layers compute in the stored compute dtype.
    The runtime's dtype (float16 on a GPU) wins, as when quantising at load: unquantised parameters are cast, and 4-bit
    layers take it for their inputs and dequantised weights. Quantised modules' own tensors are left as they are."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        Linear4bit = ()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = dtype
            module.weight.quant_state.dtype = dtype
        if type(module).__module__.startswith(("bitsandbytes", "gptqmodel.")):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def keep_4bit_layout_stable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit at its first inference forward: absmax goes to
    bfloat16 (lossy, and double quantisation is undone, so resident bytes change after loading) and the matmul
    runs in bf16 whatever compute dtype was asked. peft's adapter loading undoes the repacking, so the same base
    then gives other vectors (seen here: 0.02 max difference). With it off, 4-bit layers compute in the configured
    dtype on every CPU, the byte count stays exact, and adapters switch bit for bit.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora_adapter(model: torch.nn.Module, folder: str | os.PathLike, name: str) -> torch.nn.Module:
    """Load a peft LoRA adapter under a name; returns the PeftModel (the same one when it already is one).

    Adapters are loaded for inference and stay unmerged, so a quantised base keeps its exact weights.
    """
    from ..quiet_imports import import_peft

    import_peft()  # before any peft use: it would import gptqmodel (extra [gptq]) even for a bitsandbytes base
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        return model
    return PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
