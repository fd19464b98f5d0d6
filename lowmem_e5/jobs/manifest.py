"""The manifest of a Parquet output folder: what the vectors were made with, and per input shard its sha256, row
count, output shard and whether it is finished.

A rerun with the same identity (config, model fingerprint, fields, task) skips finished shards whose input is
unchanged, redoes the rest, and refuses another identity. Only the process that owns the manifest writes it (the
driver, on the Ray path), atomically, after a shard's output is checked and in place.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from ..errors import OutputError, ResumeMismatchError
from .atomic import write_json_atomic
from .corpus import Corpus, Shard
from .vector_shards import STAGING, check_staged, move_into_place, shard_dir

MANIFEST = "_manifest.json"  # "_": pyarrow.dataset and Spark skip it when reading the folder


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_changes(old: dict, new: dict) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Manifest:
    def __init__(self, output: str | Path, identity: dict, corpus: Corpus, *, restart: bool = False,
                 log=lambda msg: None, vectors: dict | None = None) -> None:
        self.output = Path(output)
        self.vectors = vectors  # the stored format and its calibration (EmbedSettings.vectors_entry), for readers
        self.path = self.output / MANIFEST
        self.identity = json.loads(json.dumps(identity))  # as it reads back (tuples become lists)
        self.corpus = corpus
        self._lock = threading.Lock()
        self._prepare_folder(restart, log)
        previous = json.loads(self.path.read_text()) if self.path.exists() else None
        if previous is not None and previous["identity"] != self.identity:
            raise ResumeMismatchError(
                f"{self.output} holds vectors made with other settings: "
                f"{'; '.join(identity_changes(previous['identity'], self.identity))}. Rerun with --restart to "
                "discard them, or choose another --output")
        old = previous["shards"] if previous else {}
        self.shards: dict[str, dict] = {}
        for s in corpus.shards:
            entry = {"input": str(s.path), "sha256": s.sha256, "rows": s.rows, "output": shard_dir(Path(), s.name).name,
                     "done": False}
            before = old.get(s.name)
            if before and before["done"] and shard_dir(self.output, s.name).is_dir():
                if before["sha256"] == s.sha256 and before["rows"] == s.rows:
                    entry["done"] = True
                else:
                    log(f"{s.path} changed since its vectors were made (sha256 differs): embedding it again")
            self.shards[s.name] = entry
        for name in set(old) - set(self.shards):
            log(f"shard {name!r} is no longer in the input: removing its vectors")
        for folder in self.output.glob("shard=*"):
            name = folder.name.split("=", 1)[1]
            if name not in self.shards or not self.shards[name]["done"]:
                shutil.rmtree(folder)
        shutil.rmtree(self.staging, ignore_errors=True)
        self._save()

    def _prepare_folder(self, restart: bool, log) -> None:
        if self.output.exists() and not self.output.is_dir():
            raise OutputError(f"output {str(self.output)!r} is a file; expected a folder for Parquet shards "
                              "(or a .npy path)")
        parent = self.output.parent if str(self.output.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"output folder's parent {str(parent)!r} does not exist; create it first")
        if self.output.is_dir() and any(self.output.iterdir()) and not self.path.exists():
            raise OutputError(f"output folder {str(self.output)!r} is not empty and holds no {MANIFEST}; expected "
                              "a new or empty folder, or one this command wrote")
        if restart and self.path.exists():
            log(f"--restart: discarding the vectors in {self.output}")
            for folder in self.output.glob("shard=*"):
                shutil.rmtree(folder)
            self.path.unlink()
        self.output.mkdir(exist_ok=True)

    @property
    def staging(self) -> Path:
        return self.output / STAGING

    def _save(self) -> None:
        write_json_atomic(self.path, {"identity": self.identity, "shards": self.shards,
                                      **({"vectors": self.vectors} if self.vectors else {})})

    def pending(self) -> list[Shard]:
        return [s for s in self.corpus.shards if not self.shards[s.name]["done"]]

    def finished(self) -> list[str]:
        return [name for name, e in self.shards.items() if e["done"]]

    def try_commit(self, shard: Shard) -> bool:
        """Move a staged shard into place if it holds every id of its input exactly once."""
        with self._lock:
            if self.shards[shard.name]["done"]:
                return True
            staged = shard_dir(self.staging, shard.name)
            if not check_staged(staged, self.corpus.ids[shard.name]):
                return False
            move_into_place(staged, shard_dir(self.output, shard.name))
            self.shards[shard.name]["done"] = True
            self._save()
            return True

    def finish(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
