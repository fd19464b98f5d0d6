"""BEIR folders as users have them: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
`qrels/<split>.tsv` (header `query-id corpus-id score`, tab-separated).

Documents are embedded as `title + " " + text`, stripped (the official E5 evaluation's format); a split's queries are
those its qrels name. Every problem is reported with the file and line it is on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..hashing import file_sha256
from ..jobs.inputs import parse_jsonl_line, read_lines

QRELS_HEADER = ("query-id", "corpus-id", "score")


class BeirError(InputError):
    """A BEIR folder that cannot be read as one."""


@dataclass(frozen=True)
class BeirSplit:
    root: Path
    split: str
    doc_ids: list[str]
    doc_texts: list[str]  # title + " " + text, stripped
    query_ids: list[str]  # the queries the split's qrels name, in queries.jsonl order
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> document id -> relevance
    corpus_sha256: str

    def describe(self) -> dict:
        return {"beir": str(self.root), "split": self.split, "documents": len(self.doc_ids),
                "queries": len(self.query_ids), "qrels": sum(len(d) for d in self.qrels.values()),
                "corpus_sha256": self.corpus_sha256}


def document_text(title: str, text: str) -> str:
    return f"{title} {text}".strip()


def _lines(path: Path) -> list[tuple[int, str]]:
    """jobs.inputs' reader (UTF-8 errors name the line), its errors as BeirError."""
    try:
        return read_lines(path)
    except InputError as exc:
        raise BeirError(str(exc)) from None


def _object(path: Path, number: int, line: str) -> dict:
    try:
        return parse_jsonl_line(path, number, line)
    except InputError as exc:
        raise BeirError(str(exc)) from None


def _jsonl_rows(path: Path, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) for every non-empty line; each row an object with string `_id` and `text`. Decoding and
    JSON errors come from jobs.inputs, as for encode's inputs: `path:line: ...`."""
    rows, seen = [], {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        row = _object(path, number, line)
        for field in fields:
            value = row.get(field, "" if field == "title" else None)
            if field == "_id" and isinstance(value, int) and not isinstance(value, bool):
                row["_id"] = value = str(value)  # some BEIR exports write numeric ids
            if not isinstance(value, str):
                got = "missing" if value is None else f"a {type(value).__name__}"
                raise BeirError(f"{path} line {number}: {field!r} is {got}; expected a string")
        if not (row.get("title", "") + row["text"]).strip():
            raise BeirError(f"{path} line {number}: {row['_id']!r} has no text; expected some text to embed")
        if row["_id"] in seen:
            raise BeirError(f"{path} line {number}: duplicate _id {row['_id']!r} (first on line {seen[row['_id']]})")
        seen[row["_id"]] = number
        rows.append((number, row))
    if not rows:
        raise BeirError(f"{path} has no rows; expected one JSON object per line")
    return rows


def _read_qrels(path: Path, query_ids: set[str], doc_ids: set[str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    lines = [line for _, line in _lines(path)]
    if not lines or tuple(lines[0].split("\t")) != QRELS_HEADER:
        got = repr(lines[0][:80]) if lines else "an empty file"
        raise BeirError(f"{path} line 1: {got}; expected the header {chr(9).join(QRELS_HEADER)!r} (tab-separated)")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise BeirError(f"{path} line {number}: {len(parts)} tab-separated fields; expected 3: "
                            "query-id, corpus-id, score")
        qid, did, score = parts
        try:
            relevance = int(score)
        except ValueError:
            raise BeirError(f"{path} line {number}: score {score!r} is not an integer") from None
        if qid not in query_ids:
            raise BeirError(f"{path} line {number}: query-id {qid!r} is not in queries.jsonl")
        if did not in doc_ids:
            raise BeirError(f"{path} line {number}: corpus-id {did!r} is not in corpus.jsonl")
        if did in qrels.get(qid, {}):
            raise BeirError(f"{path} line {number}: duplicate pair ({qid!r}, {did!r})")
        qrels.setdefault(qid, {})[did] = relevance
    if not qrels:
        raise BeirError(f"{path} has a header but no judgements")
    return qrels


def load_beir(root: str | Path, split: str = "test") -> BeirSplit:
    root = Path(root)
    if not root.is_dir():
        raise BeirError(f"BEIR folder {str(root)!r} does not exist; expected a folder with corpus.jsonl, "
                        "queries.jsonl and qrels/<split>.tsv")
    corpus_path, queries_path = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_path = root / "qrels" / f"{split}.tsv"
    for path in (corpus_path, queries_path):
        if not path.is_file():
            raise BeirError(f"BEIR folder {str(root)!r} has no {path.name}; expected corpus.jsonl, queries.jsonl "
                            "and qrels/<split>.tsv")
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise BeirError(f"BEIR folder {str(root)!r} has no qrels/{split}.tsv; splits there: "
                        f"{', '.join(splits) or 'none'}")
    corpus = _jsonl_rows(corpus_path, ("_id", "title", "text"))
    queries = _jsonl_rows(queries_path, ("_id", "text"))
    qrels = _read_qrels(qrels_path, {r["_id"] for _, r in queries}, {r["_id"] for _, r in corpus})
    picked = [r for _, r in queries if r["_id"] in qrels]
    return BeirSplit(root=root, split=split, doc_ids=[r["_id"] for _, r in corpus],
                     doc_texts=[document_text(r.get("title", ""), r["text"]) for _, r in corpus],
                     query_ids=[r["_id"] for r in picked], query_texts=[r["text"] for r in picked], qrels=qrels,
                     corpus_sha256=file_sha256(corpus_path))


def suggested_instruction(root: str | Path) -> str | None:
    """The query instruction a labelled set built by this project records for a part (calibration/labelled_v*/
    manifest.json, parts.<folder name>.instruction), or None for other BEIR folders."""
    root = Path(root)
    manifest = root.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())["parts"][root.name]["instruction"]
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
