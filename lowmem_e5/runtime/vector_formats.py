"""The formats an index can store vectors in: quantise, bytes per vector, and scoring float queries against codes.

| format   | code per vector                      | bytes per vector | score of a float query              |
|----------|--------------------------------------|------------------|-------------------------------------|
| float32  | the vector                           | 4 d              | inner product                       |
| float16  | the vector, rounded to half          | 2 d              | inner product with the half values  |
| int8     | round((x - min) / step) - 128, clipped to [-128, 127] | d | inner product with the dequantised vector |
| uint8    | round((x - min) / step), clipped to [0, 255]          | d | the same                      |
| binary   | sign bits (x > 0), packed 8 per byte, minus 128 (int8) | ceil(d / 8) | Hamming distance; rescoring: inner product with +-1 |
| ubinary  | sign bits (x > 0), packed 8 per byte (uint8)           | ceil(d / 8) | the same                     |

`step = (max - min) / 255` per dimension, min and max from a calibration sample (`VectorCalibration`), so codes of
two calls, batches or workers are comparable, and values outside the sampled range clip (sentence-transformers'
`quantize_embeddings` takes the range of the batch it is given unless told otherwise, and its casts wrap around).
Binary codes are sentence-transformers' exactly (`np.packbits(x > 0)`, big-endian bit order; binary = packed - 128),
so they interoperate; `centred` subtracts a per-dimension centre (the calibration sample's mean) before the sign, a
known fix for anisotropic embeddings, measured in docs/index-memory.md; rescoring then takes the inner product of
the query centred the same way with the +-1 signs (the raw query against them adds a per-document term, centre .
signs, that no query asked for: measured worse, docs/index-memory.md). uint8 and int8 (ubinary and binary) hold the
same information shifted by 128: they rank identically.

numpy does the bit work: `packbits`, `unpackbits`, `bitwise_count`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

FORMATS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
SCALAR = ("int8", "uint8")
BINARY = ("binary", "ubinary")
LEVELS = 255  # steps between min and max: 256 codes
CALIBRATION_KIND = "lowmem-e5 vector calibration"
CALIBRATION_VERSION = 1


class VectorFormatError(InputError):
    """A vector format, a calibration or stored codes that cannot be used as asked."""


@dataclass(frozen=True)
class VectorFormat:
    """A format name and, for binary and ubinary, whether the calibration's centre is subtracted before the sign.
    Written `binary` or `binary:centred`."""

    name: str = "float32"
    centred: bool = False

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise VectorFormatError(f"vector format {self.name!r} is not known; expected one of: "
                                    f"{', '.join(FORMATS)} (binary and ubinary also as NAME:centred)")
        if self.centred and self.name not in BINARY:
            raise VectorFormatError(f"vector format {self.name}:centred is not valid; only binary and ubinary take "
                                    "a centre")

    @classmethod
    def parse(cls, text: str) -> VectorFormat:
        name, _, option = text.strip().partition(":")
        if option not in ("", "centred"):
            raise VectorFormatError(f"vector format {text!r} is not valid; expected one of: {', '.join(FORMATS)}, "
                                    "or binary:centred / ubinary:centred")
        return cls(name, option == "centred")

    def __str__(self) -> str:
        return self.name + (":centred" if self.centred else "")

    @property
    def needs_calibration(self) -> bool:
        return self.name in SCALAR or self.centred

    @property
    def is_binary(self) -> bool:
        return self.name in BINARY

    @property
    def dtype(self) -> np.dtype:
        return np.dtype({"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
                         "binary": np.int8, "ubinary": np.uint8}[self.name])

    def code_width(self, dimensions: int) -> int:
        """Values per stored vector: d, or ceil(d / 8) packed bytes."""
        return -(-dimensions // 8) if self.is_binary else dimensions

    def bytes_per_vector(self, dimensions: int) -> int:
        return self.code_width(dimensions) * self.dtype.itemsize


def parse_formats(text: str) -> list[VectorFormat]:
    """A comma-separated list (`float32,int8,binary:centred`), each checked, duplicates refused."""
    formats = [VectorFormat.parse(part) for part in text.split(",") if part.strip()]
    if not formats:
        raise VectorFormatError(f"no vector format in {text!r}; expected some of: {', '.join(FORMATS)}")
    names = [str(f) for f in formats]
    if len(set(names)) != len(names):
        raise VectorFormatError(f"vector formats {text!r} name one twice")
    return formats


def check_rescore(fmt: VectorFormat, rescore: int) -> None:
    """Rescoring (the k x N Hamming-nearest ranked by the float query) applies to binary formats only."""
    if rescore < 0:
        raise VectorFormatError(f"rescore={rescore} is not valid; expected 0 (none) or a factor >= 1")
    if rescore and not fmt.is_binary:
        raise VectorFormatError(f"rescoring applies to binary and ubinary; {fmt} is already scored by the float "
                                "query's inner product with the stored vector")


def sample_indices(n: int, rows: int, seed: int = 0) -> np.ndarray:
    """The rows a calibration is taken from: a fixed random draw of `rows` of `n`, in order (all of them when there
    are fewer)."""
    if n <= rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, rows, replace=False))


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class VectorCalibration:
    """Per-dimension min, max and mean of a sample of document vectors, and what made them (`identity`: the model
    fingerprint, the mode and the adapter). Every call that writes or reads codes of one index uses one of these."""

    minimum: np.ndarray
    maximum: np.ndarray
    centre: np.ndarray
    identity: dict
    sample: dict = field(default_factory=dict)  # where the sample came from: rows, source, sha256

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, identity: dict, sample: dict | None = None) -> VectorCalibration:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) < 2:
            raise VectorFormatError(f"a calibration sample of shape {vectors.shape}; expected at least 2 vectors")
        centre = vectors.mean(axis=0, dtype=np.float64).astype(np.float32)
        return cls(vectors.min(axis=0), vectors.max(axis=0), centre, json.loads(json.dumps(identity)),
                   {"rows": int(len(vectors)), **(sample or {})})

    @property
    def dimensions(self) -> int:
        return int(self.minimum.shape[0])

    @property
    def step(self) -> np.ndarray:
        span = (self.maximum - self.minimum).astype(np.float32)
        return np.where(span > 0, span / LEVELS, np.float32(1.0)).astype(np.float32)  # a constant dimension: code 0

    def to_dict(self) -> dict:
        return {"kind": CALIBRATION_KIND, "version": CALIBRATION_VERSION, "identity": self.identity,
                "sample": self.sample, "dimensions": self.dimensions, "min": self.minimum.tolist(),
                "max": self.maximum.tolist(), "centre": self.centre.tolist()}

    @property
    def sha256(self) -> str:
        return _digest(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration") -> VectorCalibration:
        if not isinstance(data, dict) or data.get("kind") != CALIBRATION_KIND:
            raise VectorFormatError(f"{where} is not a vector calibration; expected a file written by "
                                    "`lowmem-e5 calibrate-vectors`")
        if data.get("version") != CALIBRATION_VERSION:
            raise VectorFormatError(f"{where} has version {data.get('version')!r}; expected {CALIBRATION_VERSION}")
        arrays = [np.asarray(data.get(k, []), dtype=np.float32) for k in ("min", "max", "centre")]
        d = data.get("dimensions")
        if any(a.shape != (d,) for a in arrays) or not (arrays[0] <= arrays[1]).all():
            raise VectorFormatError(f"{where}: min, max and centre must be {d} values each with min <= max")
        return cls(*arrays, identity=data.get("identity", {}), sample=data.get("sample", {}))

    @classmethod
    def read(cls, path: str | Path) -> VectorCalibration:
        path = Path(path)
        if not path.is_file():
            raise VectorFormatError(f"calibration file {str(path)!r} does not exist; make it with "
                                    "`lowmem-e5 calibrate-vectors --input DOCS --output FILE`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VectorFormatError(f"calibration file {str(path)!r} is not JSON ({exc})") from None
        return cls.from_dict(data, where=f"calibration file {str(path)!r}")

    def check(self, identity: dict, where: str = "the calibration") -> None:
        """Refuse ranges made by another model, mode or adapter, saying which and how."""
        ours, theirs = json.loads(json.dumps(identity)), self.identity
        changed = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        if changed:
            detail = "; ".join(f"{k}: {_short(theirs.get(k))} there, {_short(ours.get(k))} here" for k in changed)
            raise VectorFormatError(f"{where} was made with another {', '.join(changed)} ({detail}); its ranges do "
                                    "not fit these vectors: make new ones with `lowmem-e5 calibrate-vectors` using "
                                    "this model, mode and adapter")


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else f"sha256:{_digest(value)[:12]}"


def _check_dimensions(vectors: np.ndarray, calibration: VectorCalibration | None) -> None:
    if calibration is not None and vectors.shape[-1] != calibration.dimensions:
        raise VectorFormatError(f"vectors have {vectors.shape[-1]} dimensions, the calibration "
                                f"{calibration.dimensions}; expected the calibration of these vectors' model")


def require_calibration(fmt: VectorFormat, calibration: VectorCalibration | None) -> VectorCalibration | None:
    if fmt.needs_calibration and calibration is None:
        raise VectorFormatError(f"vector format {fmt} needs a calibration (per-dimension ranges of a sample of "
                                "documents); make one with `lowmem-e5 calibrate-vectors` and pass it (--ranges FILE)")
    return calibration


def sign_bits(vectors: np.ndarray, fmt: VectorFormat, calibration: VectorCalibration | None = None) -> np.ndarray:
    """Packed sign bits (uint8, n x ceil(d/8)) of float vectors: x > 0, or x - centre > 0 for a centred format."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if fmt.centred:
        vectors = vectors - require_calibration(fmt, calibration).centre
    return np.packbits(vectors > 0, axis=-1)


def quantize(vectors: np.ndarray, fmt: VectorFormat | str,
             calibration: VectorCalibration | None = None) -> np.ndarray:
    """Float vectors (n x d) -> codes of the format (n x code width, the format's dtype)."""
    fmt = VectorFormat.parse(fmt) if isinstance(fmt, str) else fmt
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise VectorFormatError(f"vectors of shape {vectors.shape}; expected (rows, dimensions)")
    _check_dimensions(vectors, calibration if fmt.needs_calibration else None)
    if fmt.name == "float32":
        return vectors
    if fmt.name == "float16":
        return vectors.astype(np.float16)
    if fmt.name in SCALAR:
        cal = require_calibration(fmt, calibration)
        levels = np.clip(np.rint((vectors - cal.minimum) / cal.step), 0, LEVELS)
        return (levels - 128).astype(np.int8) if fmt.name == "int8" else levels.astype(np.uint8)
    packed = sign_bits(vectors, fmt, calibration)
    return (packed.astype(np.int16) - 128).astype(np.int8) if fmt.name == "binary" else packed


def packed_bits(codes: np.ndarray, fmt: VectorFormat) -> np.ndarray:
    """Binary or ubinary codes as the packed uint8 sign bits."""
    codes = np.asarray(codes)
    return (codes.astype(np.int16) + 128).astype(np.uint8) if fmt.name == "binary" else codes.astype(np.uint8)


def dequantize(codes: np.ndarray, fmt: VectorFormat | str, calibration: VectorCalibration | None = None,
               dimensions: int | None = None) -> np.ndarray:
    """Codes -> float32 vectors as scoring sees them: the float values, min + level * step, or +-1 per sign bit."""
    fmt = VectorFormat.parse(fmt) if isinstance(fmt, str) else fmt
    codes = np.asarray(codes)
    if fmt.name in ("float32", "float16"):
        return codes.astype(np.float32)
    if fmt.name in SCALAR:
        cal = require_calibration(fmt, calibration)
        levels = codes.astype(np.float32) + (128 if fmt.name == "int8" else 0)
        return cal.minimum + levels * cal.step
    d = dimensions if dimensions is not None else codes.shape[-1] * 8
    return np.unpackbits(packed_bits(codes, fmt), axis=-1, count=d).astype(np.float32) * 2 - 1


def scores(queries: np.ndarray, codes: np.ndarray, fmt: VectorFormat | str,
           calibration: VectorCalibration | None = None) -> np.ndarray:
    """Inner products of float queries (q x d) with stored codes (n x width): q x n float32. Binary codes score as
    +-1 vectors (what rescoring ranks by); against centred ones the query is centred too: (q - centre) . signs."""
    fmt = VectorFormat.parse(fmt) if isinstance(fmt, str) else fmt
    queries = np.asarray(queries, dtype=np.float32)
    if fmt.centred:
        queries = queries - require_calibration(fmt, calibration).centre
    return queries @ dequantize(codes, fmt, calibration, dimensions=queries.shape[-1]).T


def hamming(query_bits: np.ndarray, codes: np.ndarray, fmt: VectorFormat) -> np.ndarray:
    """Hamming distances between packed query sign bits (q x w uint8) and binary codes (n x w): q x n int32."""
    docs = packed_bits(codes, fmt)
    return np.bitwise_count(query_bits[:, None, :] ^ docs[None, :, :]).sum(axis=-1, dtype=np.int32)


def index_identity(model_source: str, config, adapter: str | Path | None = None) -> dict:
    """What a calibration is tied to: the model's fingerprint (however it is named), the weight mode (quantisation,
    double quantisation, mixed-precision overrides, GPTQ group size) and the adapter's fingerprint. Batching, the
    compute dtype and the device change vectors only by float rounding, well inside one int8 step."""
    from .fingerprint import adapter_fingerprint, model_identity

    mode = {"quant": config.quant, "double_quant": config.double_quant, "overrides": list(config.overrides)}
    if config.quant == "gptq4":
        mode["group_size"] = config.group_size
    return {"model": model_identity(model_source), "mode": mode,
            "adapter": adapter_fingerprint(adapter) if adapter else None}
