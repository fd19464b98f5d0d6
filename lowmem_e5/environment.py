"""What this machine offers: versions, devices, and whether bitsandbytes really runs here."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "bitsandbytes", "peft", "optimum", "tokenizers", "safetensors", "numpy", "gguf")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu() -> dict:
    """What CPU speed figures depend on: the model, torch's kernel level, and AVX512-BF16 (fast bf16 matmuls, and
    bitsandbytes' 4-bit repacking, see runtime.loading.keep_4bit_layout_stable)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {"name": info.get("model name") or platform.processor() or platform.machine(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in info.get("flags", "").split()}


def devices() -> list[dict]:
    found = [{"device": "cpu", **cpu(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append({"device": f"cuda:{i}", "name": props.name, "memory_bytes": props.total_memory,
                          "capability": f"{props.major}.{props.minor}"})
    return found


def bitsandbytes_check(device: str) -> dict[str, str]:
    """Run one int8 and one nf4 layer against fp32 on device: 'ok (rel err x)' or the error."""
    results: dict[str, str] = {}
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # import failures differ by platform; report them all the same way
        return {"import": f"failed: {exc}"}
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.float16
    ref = torch.nn.Linear(256, 128, bias=False)
    x = torch.randn(4, 256)
    expected = ref(x)
    layers = {
        "int8": lambda: bnb.nn.Linear8bitLt(256, 128, bias=False, has_fp16_weights=False),
        "nf4": lambda: bnb.nn.Linear4bit(256, 128, bias=False, quant_type="nf4", compute_dtype=dtype),
        "fp4": lambda: bnb.nn.Linear4bit(256, 128, bias=False, quant_type="fp4", compute_dtype=dtype),
    }
    for name, make in layers.items():
        try:
            layer = make()
            param_cls = bnb.nn.Int8Params if name == "int8" else bnb.nn.Params4bit
            kwargs = {"requires_grad": False} if name == "int8" else {"requires_grad": False, "quant_type": name}
            if name == "int8":
                layer.weight = param_cls(ref.weight.data.clone(), has_fp16_weights=False, requires_grad=False)
            else:
                layer.weight = param_cls(ref.weight.data.clone(), **kwargs)
            layer = layer.to(device)
            with torch.inference_mode():
                got = layer(x.to(device=device, dtype=dtype)).float().cpu()
            err = ((got - expected).norm() / expected.norm()).item()
            results[name] = f"ok (relative error {err:.3f})" if err < 0.2 else f"wrong (relative error {err:.3f})"
        except Exception as exc:  # any failure here is the diagnosis we want to print
            results[name] = f"failed: {type(exc).__name__}: {exc}"
    return results


def report() -> dict:
    from .default_model import default_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "devices": devices(),
        "bitsandbytes": {"device": device, **bitsandbytes_check(device)},
        "default_model": {"path": str(default_model_path()),
                          "built": (default_model_path() / "config.json").is_file()},
        "offline": os.environ.get("HF_HUB_OFFLINE") == "1",
    }
