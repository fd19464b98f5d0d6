"""The versioned calibration set: real texts with kind (query/document), task, language, content and split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InputError
from .instructions import format_query, task_instruction

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "calibration"  # the repository's calibration/
DEFAULT_SET = CALIBRATION_DIR / "set_v1.jsonl"
Split = Literal["tune", "heldout", "all"]
SPLITS = ("tune", "heldout", "all")


@dataclass(frozen=True)
class CalibrationRow:
    id: str
    kind: str  # "query" or "document"
    task: str | None
    text: str
    source: str
    lang: str
    content: str
    split: str


@dataclass(frozen=True)
class CalibrationSet:
    version: str
    sha256: str
    rows: list[CalibrationRow]

    def select(self, split: str = "all", max_chars: int | None = None) -> CalibrationSet:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not valid; expected one of: {', '.join(SPLITS)}")
        rows = [r for r in self.rows if split == "all" or r.split == split]
        if max_chars is not None:
            rows = [r for r in rows if len(r.text) <= max_chars]
        return CalibrationSet(self.version, self.sha256, rows)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rows]

    def queries(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r.kind == "query"]

    def documents(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r.kind == "document"]

    def model_texts(self) -> list[str]:
        """What the model reads: queries with their task's instruction, documents as they are."""
        return [format_query(r.text, task_instruction(r.task)) if r.kind == "query" else r.text for r in self.rows]


def load_calibration_set(path: str | Path | None = None) -> CalibrationSet:
    """Load and verify against the manifest beside it (sha256)."""
    path = Path(path) if path is not None else DEFAULT_SET
    if not path.is_file():
        raise InputError(f"calibration set {str(path)!r} does not exist")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    manifest_path = path.parent / "manifest.json"
    version = path.stem
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("file") == path.name:
            if manifest["sha256"] != sha:
                raise InputError(f"calibration set {str(path)!r} has sha256 {sha}; its manifest says {manifest['sha256']}")
            version = manifest["version"]
    rows = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            rows.append(CalibrationRow(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"{path}:{lineno}: not a calibration row ({exc})") from None
    return CalibrationSet(version=version, sha256=sha, rows=rows)
