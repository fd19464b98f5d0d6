"""Named LoRA adapters on one base model: load (safetensors only), list, activate, deactivate, delete, merge.

The base is loaded once. Adapters stay unmerged on quantised bases (merging into 4-bit weights drifts, peft #2321),
and a request picks its adapter per call (or per row: peft's mixed-batch forward), so one 4-bit base serves many
domains. Validation happens before peft sees the folder, so bad adapters fail with a message that says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowmemError

BASE = "__base__"  # peft's name for "no adapter" in mixed batches


class AdapterError(LowmemError, ValueError):
    """An adapter folder, name or shape is not usable with this base."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    folder: str
    rank: int
    target_modules: tuple[str, ...]
    bytes: int  # parameters the adapter adds to the model


def read_adapter_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {str(folder)!r} does not exist")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"adapter folder {str(folder)!r} has no adapter_config.json; expected a peft LoRA adapter")
    if not (folder / "adapter_model.safetensors").is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise AdapterError(f"adapter folder {str(folder)!r} has no adapter_model.safetensors (found: {found}); "
                           "pickled .bin weights are refused, convert them to safetensors")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {str(folder)!r} is peft_type={config.get('peft_type')!r}; expected 'LORA'")
    return config


def _base_linears(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features), for plain, bitsandbytes and GPTQ Linears alike."""
    shapes = {}
    for name, module in model.named_modules():
        gptq = type(module).__module__.startswith("gptqmodel.") and hasattr(module, "in_features")
        if (isinstance(module, torch.nn.Linear) or gptq) and ".lora_" not in name:
            # once wrapped by peft, base_model.model.<name>.base_layer is the original Linear
            clean = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            shapes[clean] = (module.out_features, module.in_features)
    return shapes


def check_adapter_shapes(folder: Path, model: torch.nn.Module, config: dict) -> None:
    """Target modules must exist in the base and LoRA matrices must fit their in/out features."""
    from safetensors import safe_open

    linears = _base_linears(model)
    suffixes = {n.rsplit(".", 1)[-1] for n in linears}
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    missing = [t for t in targets if t not in suffixes and t not in linears]
    if missing:
        raise AdapterError(f"adapter {str(folder)!r} targets {missing}, which the base model lacks; "
                           f"its Linear modules are: {', '.join(sorted(suffixes))}")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            # base_model.model.layers.0.self_attn.q_proj.lora_A.weight -> layers.0.self_attn.q_proj
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            if module not in linears:
                raise AdapterError(f"adapter {str(folder)!r} has weights for {module!r}, which the base model lacks")
            out_f, in_f = linears[module]
            shape = tuple(f.get_slice(key).get_shape())
            expected_dim, axis = (in_f, 1) if ".lora_A." in key else (out_f, 0)
            if shape[axis] != expected_dim:
                raise AdapterError(
                    f"adapter {str(folder)!r} was made for another base: {key} has shape {shape}, but {module} of "
                    f"this model has in_features={in_f}, out_features={out_f}")


class AdapterSet:
    """The adapters loaded on one base model. Wraps the model in a peft PeftModel on the first load."""

    def __init__(self, model: torch.nn.Module, base_is_quantized: bool) -> None:
        self.model = model
        self.base_is_quantized = base_is_quantized
        self._adapters: dict[str, AdapterInfo] = {}
        self.active: str | None = None
        self.version = 0  # bumped whenever the set of weights changes (load, delete, merge)

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def info(self, name: str) -> AdapterInfo:
        self._require(name)
        return self._adapters[name]

    def _require(self, name: str) -> None:
        if name not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise AdapterError(f"adapter {name!r} is not loaded; loaded adapters: {loaded}")

    def load(self, name: str, folder: str | Path) -> AdapterInfo:
        from .loading import attach_lora_adapter

        if not name or name == BASE or not name.replace("-", "_").replace(".", "_").isidentifier():
            raise AdapterError(f"adapter name {name!r} is not valid; expected letters, digits, '_', '-' or '.'")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already loaded; delete it first or use another name")
        folder = Path(folder)
        config = read_adapter_config(folder)
        check_adapter_shapes(folder, self.model, config)
        before = {id(p) for p in self.model.parameters()}
        self.model = attach_lora_adapter(self.model, folder, name)
        added = sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in before)
        info = AdapterInfo(name=name, folder=str(folder), rank=int(config.get("r", 0)),
                           target_modules=tuple(config.get("target_modules") or ()), bytes=added)
        self._adapters[name] = info
        self.version += 1
        self.deactivate()  # a newly loaded adapter is never silently active
        return info

    def activate(self, name: str) -> None:
        self._require(name)
        self.model.set_adapter(name)
        self.model.base_model.enable_adapter_layers()
        self.active = name

    def deactivate(self) -> None:
        if self._adapters:
            self.model.base_model.disable_adapter_layers()
        self.active = None

    def delete(self, name: str) -> None:
        self._require(name)
        self.model.delete_adapter(name)
        del self._adapters[name]
        self.version += 1
        if not self._adapters:
            # peft keeps the deleted name active when it was the last one, and its next forward fails (KeyError):
            # unwrap back to the bare base (layers unmerged, weights untouched); the next load wraps it again.
            self.model = self.model.unload()
            self.active = None
        elif self.active == name:
            self.deactivate()  # peft would switch to another adapter; we fall back to the base

    def merge(self, name: str) -> torch.nn.Module:
        """Fold one adapter into a full-precision base and return the plain model (the set is then empty)."""
        self._require(name)
        if self.base_is_quantized:
            raise AdapterError(f"adapter {name!r} cannot be merged into a quantised base (4-bit/8-bit merges drift); "
                               "keep it unmerged, or load the base in fp32/fp16/bf16 to merge")
        merged = self.model.merge_and_unload(adapter_names=[name])
        self._adapters.clear()
        self.active = None
        self.version += 1
        self.model = merged
        return merged
