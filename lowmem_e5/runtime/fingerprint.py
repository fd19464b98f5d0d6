"""What identifies a model for drift: hashes of its config, weights and tokenizer, plus library versions.

A reference made from one model must never be compared with another model's embeddings; the fingerprint is
computed from the model folder (not the loaded, possibly quantised, object) so every mode of one checkpoint shares it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ..environment import package_versions
from .checkpoints import read_checkpoint

FULL_HASH_LIMIT = 2 << 30  # files above 2 GiB are hashed by size, header and both ends (a full 14 GB read is minutes)


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return _cached_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _cached_digest(path: str, size: int, _mtime_ns: int) -> str:
    """Keyed by size and mtime, so every drift run of a compare grid does not re-read the same weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(16 << 20))
            f.seek(size - (16 << 20))
            h.update(f.read())
    return h.hexdigest()


def _digest_files(folder: Path, patterns: list[str]) -> str:
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in folder.glob(pat)})
    for p in files:
        h.update(p.name.encode())
        h.update(_file_digest(p).encode())
    return h.hexdigest() if files else "none"


def local_folder(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # hub id: the cached snapshot that was loaded

    return Path(snapshot_download(source, local_files_only=True))


def model_fingerprint(source: str) -> dict:
    """A pre-quantised checkpoint (`lowmem-e5 quantize`) carries its source model's fingerprint, so the source's
    references apply to it; which quantisation it holds is added."""
    folder = local_folder(source)
    record = read_checkpoint(folder)
    if record is not None:
        return {**record["source_fingerprint"], "checkpoint": record["quantization"]}
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("transformers_version", None)
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    return {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": _digest_files(folder, ["*.safetensors", "*.bin"]),
        "tokenizer_sha256": _digest_files(folder, ["tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                   "special_tokens_map.json"]),
        "versions": {k: v for k, v in package_versions().items() if k in ("torch", "transformers", "tokenizers")},
    }


def model_identity(source: str) -> dict:
    """The fingerprint without library versions: what result records and caches are tied to."""
    fingerprint = model_fingerprint(source)
    fingerprint.pop("versions", None)
    return fingerprint


def same_model(a: dict, b: dict) -> list[str]:
    """The identity fields that differ (library versions are recorded, not enforced)."""
    return [k for k in ("config_sha256", "weights_sha256", "tokenizer_sha256") if a.get(k) != b.get(k)]


def adapter_fingerprint(folder: str | Path) -> str:
    """sha256 over a peft adapter folder's config and weight files: vectors made with it are tied to its contents."""
    return _digest_files(Path(folder), ["adapter_config.json", "*.safetensors"])
