"""Exact bytes of a loaded model's weights, bitsandbytes and GPTQ quantisation constants included."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightBytes:
    quantized: int  # packed int8 / 4-bit weight data
    constants: int  # absmax, codebooks, nested absmax, int8 row scales
    full_precision: int  # everything left in 16/32-bit: token embedding, norms

    @property
    def total(self) -> int:
        return self.quantized + self.constants + self.full_precision

    def to_dict(self) -> dict[str, int]:
        return {"quantized": self.quantized, "constants": self.constants,
                "full_precision": self.full_precision, "total": self.total}


def _quant_state_tensors(param) -> list[torch.Tensor]:
    """The tensors a bitsandbytes parameter keeps beside its packed data."""
    tensors: list[torch.Tensor] = []
    state = getattr(param, "quant_state", None)  # Params4bit
    while state is not None:
        for name in ("absmax", "code", "offset"):
            t = getattr(state, name, None)
            if isinstance(t, torch.Tensor):
                tensors.append(t)
        state = getattr(state, "state2", None)  # double quantisation nests one more state
    scb = getattr(param, "SCB", None)  # Int8Params: one fp32 scale per output row
    if isinstance(scb, torch.Tensor):
        tensors.append(scb)
    return tensors


def _key(t: torch.Tensor) -> tuple:
    # Storage identity, so tied weights and shared codebooks count once. Meta tensors have no storage:
    # fall back to object identity there.
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)


GPTQ_PACKED = ("qweight",)  # int32 words of eight 4-bit weights; scales, qzeros, g_idx and the kernel's small
# unpacking tables are constants


def _gptq_buffers(model: torch.nn.Module):
    """(name, tensor) of every buffer of gptqmodel's quantised Linear layers."""
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel."):
            for name, buf in module.named_buffers(recurse=False):
                yield name, buf


def weight_bytes(model: torch.nn.Module) -> WeightBytes:
    seen: set[tuple] = set()
    quantized = constants = full = 0
    for name, buf in _gptq_buffers(model):
        key = _key(buf)
        if key not in seen:
            seen.add(key)
            if name in GPTQ_PACKED:
                quantized += buf.numel() * buf.element_size()
            else:
                constants += buf.numel() * buf.element_size()
    for param in model.parameters():  # parameters() already skips tied duplicates
        key = _key(param)
        if key not in seen:
            seen.add(key)
            nbytes = param.numel() * param.element_size()
            if param.dtype in (torch.int8, torch.uint8):
                quantized += nbytes
            else:
                full += nbytes
        for t in _quant_state_tensors(param):
            k = _key(t)
            if k not in seen:
                seen.add(k)
                constants += t.numel() * t.element_size()
    return WeightBytes(quantized=quantized, constants=constants, full_precision=full)


def quantized_linear_count(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of each bitsandbytes or gptqmodel class the model holds (empty when not quantised)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if type(module).__module__.startswith(("bitsandbytes", "gptqmodel.")):
            counts[name] = counts.get(name, 0) + 1
    return counts


def release_freed_memory() -> None:
    """Hand the heap that loading freed (the full-precision copies read before quantising, the loader's buffers)
    back to the OS. glibc keeps freed memory in its arenas, so without this a process that quantised at load holds
    hundreds of MB it no longer uses (scripts/memory_breakdown.py measures it). A no-op where glibc is absent."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    trim(0)
