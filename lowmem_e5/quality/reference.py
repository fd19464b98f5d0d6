"""Full-precision reference embeddings of the calibration set, stored as safetensors with the model fingerprint."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..runtime.calibration_set import CalibrationSet
from ..runtime.encoder import Embedder, EncodeStats
from ..runtime.fingerprint import model_fingerprint, same_model


def encode_calibration(embedder: Embedder, cset: CalibrationSet,
                       adapter: str | None = None) -> tuple[np.ndarray, EncodeStats]:
    """(n, hidden) fp32 in set order (queries with their task's instruction, documents plain), and the stats."""
    return embedder.encode(cset.model_texts(), adapter=adapter)


def embed_calibration(embedder: Embedder, cset: CalibrationSet, adapter: str | None = None) -> np.ndarray:
    return encode_calibration(embedder, cset, adapter)[0]


@dataclass(frozen=True)
class Reference:
    embeddings: np.ndarray  # (n, hidden) fp32
    ids: list[str]
    fingerprint: dict
    set_version: str
    set_sha256: str
    mode: str
    max_length: int
    source: str = ""

    def check_model(self, source: str) -> None:
        differ = same_model(self.fingerprint, model_fingerprint(source))
        if differ:
            raise InputError(f"the reference was made from another model ({', '.join(differ)} differ); "
                             f"make a reference for {source!r} with `lowmem-e5 reference`")

    def check_set(self, cset: CalibrationSet) -> None:
        if cset.sha256 != self.set_sha256:
            raise InputError(f"the reference was made on calibration set {self.set_version} ({self.set_sha256[:12]}), "
                             f"not on {cset.version} ({cset.sha256[:12]})")


def write_reference(path: str | Path, embeddings: np.ndarray, cset: CalibrationSet, source: str, mode: str,
                    max_length: int) -> Reference:
    from safetensors.numpy import save_file

    path = Path(path)
    ref = Reference(embeddings=np.ascontiguousarray(embeddings, dtype=np.float32), ids=cset.ids,
                    fingerprint=model_fingerprint(source), set_version=cset.version, set_sha256=cset.sha256,
                    mode=mode, max_length=max_length, source=source)
    metadata = {"ids": json.dumps(ref.ids), "fingerprint": json.dumps(ref.fingerprint), "set_version": ref.set_version,
                "set_sha256": ref.set_sha256, "mode": mode, "max_length": str(max_length), "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"embeddings": ref.embeddings}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return ref


def read_reference(path: str | Path) -> Reference:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference {str(path)!r} does not exist; make it with `lowmem-e5 reference`")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if "fingerprint" not in meta or "embeddings" not in f.keys():
            raise InputError(f"{str(path)!r} is not a lowmem-e5 reference (no fingerprint or embeddings)")
        embeddings = f.get_tensor("embeddings")
    return Reference(embeddings=embeddings, ids=json.loads(meta["ids"]), fingerprint=json.loads(meta["fingerprint"]),
                     set_version=meta["set_version"], set_sha256=meta["set_sha256"], mode=meta["mode"],
                     max_length=int(meta["max_length"]), source=meta.get("source", ""))
