"""Runtime configuration: a frozen dataclass that checks itself and round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

QuantMode = Literal["fp32", "fp16", "bf16", "int8", "nf4", "fp4", "gptq4"]
ComputeDtype = Literal["float32", "float16", "bfloat16"]
PaddingSide = Literal["left", "right"]

QUANT_MODES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4", "gptq4")
GPTQ_MODES: tuple[str, ...] = ("gptq4",)  # calibrated 4-bit through optimum + gptqmodel (extra [gptq])
GPTQ_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
FULL_PRECISION_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FOUR_BIT_MODES: tuple[str, ...] = ("nf4", "fp4")
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
PADDING_SIDES: tuple[str, ...] = ("left", "right")

# "default" names the embedded small real model (SmolLM2-135M copied into a MistralModel), built into the cache.
DEFAULT_MODEL = "default"
E5_MISTRAL_HUB_ID = "intfloat/e5-mistral-7b-instruct"


LINEAR_OVERRIDE_FORMATS: tuple[str, ...] = ("full", "int8")
EMBEDDING_OVERRIDE_FORMATS: tuple[str, ...] = ("int8", "nf4")
EMBEDDING_MODULE = "embed_tokens"


def parse_override(entry: str) -> tuple[str, str]:
    """'layers.3.mlp.down_proj=int8' -> ('layers.3.mlp.down_proj', 'int8'), checked."""
    name, sep, fmt = str(entry).partition("=")
    if not sep or not name.strip():
        raise ValueError(f"overrides entry {entry!r} is not valid; expected 'module.name=format'")
    valid = EMBEDDING_OVERRIDE_FORMATS if name == EMBEDDING_MODULE else LINEAR_OVERRIDE_FORMATS
    if fmt not in valid:
        raise ValueError(f"overrides entry {entry!r} has format {fmt!r}; expected one of: {', '.join(valid)} for {name!r}")
    return name.strip(), fmt


def _check_choice(field: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{field}={value!r} is not valid; expected one of: {', '.join(valid)}")


@dataclass(frozen=True)
class RuntimeConfig:
    """How to load and run the embedding model."""

    model: str = DEFAULT_MODEL  # hub id, local folder, or "default" (the cached small real model)
    quant: QuantMode = "nf4"  # nf4 fits E5-Mistral-7B on an 8 GB card with room for activations
    double_quant: bool = False  # quantise the 4-bit block constants too (~0.4 bit/param saved)
    compute_dtype: ComputeDtype | None = None  # None: float32 on CPU (fast there), float16 on GPU
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    max_length: int = 4096  # tokens per text including BOS and EOS (the model card's value)
    token_budget: int = 16384  # padded tokens per forward batch; halved on out-of-memory
    truncate: bool = True  # False: a text longer than max_length is an error
    padding_side: PaddingSide = "right"  # pooling and positions are correct with either
    cache_query_prefix: bool = True  # run each instruction prefix once and reuse its keys/values for all queries
    # LLM.int8() outlier threshold of 8-bit layers (transformers' default 6.0). Outlier columns are chosen over the
    # whole batch, so int8 vectors move with their batch neighbours; 0 turns the decomposition off: every token is
    # quantised on its own and a text gets the same vector in any batch.
    int8_threshold: float = 6.0
    # Mixed precision: "module=format" entries over the base quant, e.g. "layers.0.mlp.down_proj=int8" keeps one
    # Linear in 8-bit under nf4, "=full" keeps it unquantised, "embed_tokens=int8" quantises the token embedding.
    overrides: tuple[str, ...] = ()
    # gptq4: input columns per group of scales and zeros (smaller: more constants, closer weights)
    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model={self.model!r} is not valid; expected a hub id, a local folder or 'default'")
        _check_choice("quant", self.quant, QUANT_MODES)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} is not valid; expected true or false")
        if self.double_quant and self.quant not in FOUR_BIT_MODES:
            raise ValueError(
                f"double_quant=True is not valid with quant={self.quant!r}; expected quant in: {', '.join(FOUR_BIT_MODES)}"
            )
        if self.compute_dtype is not None:
            _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
            weights_dtype = FULL_PRECISION_DTYPES.get(self.quant)
            if weights_dtype is not None and self.compute_dtype != weights_dtype:
                raise ValueError(
                    f"compute_dtype={self.compute_dtype!r} is not valid with quant={self.quant!r}; "
                    f"expected {weights_dtype!r} or none (full-precision modes compute in their own dtype)"
                )
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device={self.device!r} is not valid; expected one of: auto, cpu, cuda, cuda:N")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 3:
            raise ValueError(f"max_length={self.max_length!r} is not valid; expected an integer >= 3 (BOS, text, EOS)")
        if not isinstance(self.token_budget, int) or isinstance(self.token_budget, bool) or self.token_budget < 1:
            raise ValueError(f"token_budget={self.token_budget!r} is not valid; expected an integer >= 1")
        if not isinstance(self.truncate, bool):
            raise ValueError(f"truncate={self.truncate!r} is not valid; expected true or false")
        _check_choice("padding_side", self.padding_side, PADDING_SIDES)
        if isinstance(self.int8_threshold, bool) or not isinstance(self.int8_threshold, (int, float)) \
                or not self.int8_threshold >= 0:
            raise ValueError(f"int8_threshold={self.int8_threshold!r} is not valid; expected a number >= 0 "
                             "(6.0: LLM.int8() outlier decomposition, 0: none, batch-invariant vectors)")
        if not isinstance(self.cache_query_prefix, bool):
            raise ValueError(f"cache_query_prefix={self.cache_query_prefix!r} is not valid; expected true or false")
        if not isinstance(self.overrides, tuple):
            object.__setattr__(self, "overrides", tuple(self.overrides))  # lists from JSON
        if self.overrides and (self.quant in FULL_PRECISION_DTYPES or self.quant in GPTQ_MODES):
            raise ValueError(f"overrides are not valid with quant={self.quant!r}; expected a bitsandbytes base mode: "
                             "int8, nf4, fp4")
        if self.group_size not in GPTQ_GROUP_SIZES or isinstance(self.group_size, bool):
            raise ValueError(f"group_size={self.group_size!r} is not valid; expected one of: "
                             f"{', '.join(map(str, GPTQ_GROUP_SIZES))}")
        for entry in self.overrides:
            parse_override(entry)

    def override_map(self) -> dict[str, str]:
        return dict(parse_override(e) for e in self.overrides)

    # --- resolution against the machine -------------------------------------------------------
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_compute_dtype(self) -> str:
        if self.quant in FULL_PRECISION_DTYPES:
            return FULL_PRECISION_DTYPES[self.quant]
        if self.compute_dtype is not None:
            return self.compute_dtype
        return "float32" if self.resolved_device() == "cpu" else "float16"

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeConfig:
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; expected some of: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RuntimeConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)
