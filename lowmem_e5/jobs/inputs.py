"""Reading texts to embed from .txt (one per line) or .jsonl (one object per line) files, strictly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, OutputError

INPUT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class InputTexts:
    path: Path
    texts: list[str]
    line_numbers: list[int]  # 1-based line of each text, for error messages

    def where(self, index: int) -> str:
        return f"{self.path}:{self.line_numbers[index]}"


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}:{lineno}: invalid UTF-8 at byte {exc.start} of the line ({raw[exc.start:exc.start + 4]!r}); "
            "expected UTF-8 text"
        ) from None


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, decoded line) of every line; the final newline ends the last line."""
    raw_lines = path.read_bytes().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    return [(n, _decode_line(path, n, raw.rstrip(b"\r"))) for n, raw in enumerate(raw_lines, start=1)]


def parse_jsonl_line(path: Path, lineno: int, line: str) -> dict:
    if not line.strip():
        raise InputError(f"{path}:{lineno}: empty line; expected one JSON object per line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def text_field(where: str, obj: dict, field: str) -> str:
    if field not in obj:
        raise InputError(f"{where}: no {field!r} field; fields present: {', '.join(sorted(obj)) or 'none'}")
    text = obj[field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field!r} is {type(text).__name__}; expected a string")
    if not text.strip():
        raise InputError(f"{where}: empty or whitespace-only text; expected some text to embed")
    return text


def read_texts(path: str | Path, field: str = "text") -> InputTexts:
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"input {str(path)!r} is not a file; expected a .txt or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise InputError(f"input file {str(path)!r} has suffix {suffix!r}; expected one of: {', '.join(INPUT_SUFFIXES)}")
    texts: list[str] = []
    numbers: list[int] = []
    for lineno, line in read_lines(path):
        if suffix == ".jsonl":
            text = text_field(f"{path}:{lineno}", parse_jsonl_line(path, lineno, line), field)
        else:
            if not line.strip():
                raise InputError(f"{path}:{lineno}: empty or whitespace-only text; expected some text to embed")
            text = line
        texts.append(text)
        numbers.append(lineno)
    if not texts:
        raise InputError(f"input file {str(path)!r} is empty; expected at least one text")
    return InputTexts(path=path, texts=texts, line_numbers=numbers)


def check_output_path(path: str | Path, suffix: str = ".npy") -> Path:
    """Fail before any work if the output cannot be written where asked."""
    path = Path(path)
    if path.suffix != suffix:
        raise OutputError(f"output path {str(path)!r} must end in {suffix}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {str(parent)!r} does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"output path {str(path)!r} is a folder; expected a file name")
    return path
