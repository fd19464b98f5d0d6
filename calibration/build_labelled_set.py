"""Build the labelled retrieval set (BEIR format) from real text this project did not write.

Part `packages` (package search): Debian bookworm's package descriptions, as `apt-get update` fetches them
(Translation-en of main). The query is a package's one-line summary, its one relevant document the package's long
description (paragraph marks ` .` become blank lines); the package name is left out of both, so the name cannot
give the answer away. Packages whose summary or long description is shared with another package are dropped
(no unique answer), as are long descriptions under 200 or over 1,000 characters (one-liners; changelogs).
Disjoint train and test queries; one corpus holds the documents of both, so test queries search past their own.

Part `code` (code search, the CodeSearchNet formulation): functions and methods of this Python's standard library;
the query is the first sentence of a docstring, the document the function's source with its docstring removed.
Modules the calibration set draws on are left out, and test packages; summaries under 4 words, shared summaries or
sources, and sources outside 150-1,500 characters are dropped.

    python calibration/build_labelled_set.py              # runs apt-get update with English descriptions first
    python calibration/build_labelled_set.py --translation FILE   # a Translation-en file already decompressed

Writes calibration/labelled_v1/packages/{corpus,queries}.jsonl, qrels/{train,test}.tsv and
calibration/labelled_v1/manifest.json (sources, counts, sha256 of every file). Deterministic for one source file:
packages are picked and split by the sha256 of their names. The committed set is what runs use. This set has
nothing in common with the calibration set (stdlib docstrings, coreutils messages), on whose tuning split gptq4
calibrates and repair trains.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = "v1"
OUT = HERE / f"labelled_{VERSION}"
LISTS = Path("/var/lib/apt/lists")
TRANSLATION = "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4"
DOCUMENTS = 1600  # corpus size: what a CPU grid of modes can embed in minutes per mode
TEST_QUERIES = 300
MIN_CHARS, MAX_CHARS = 200, 1000
CODE_DOCUMENTS, CODE_TEST_QUERIES = 1000, 200
CODE_CHARS = (150, 1500)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def name_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def fetch_translation() -> Path:
    """apt-get update with English long descriptions (images often set Acquire::Languages "none"), decompressed."""
    subprocess.run(["apt-get", "update", "-qq", "-o", "Acquire::Languages=en"], check=True)
    compressed = LISTS / TRANSLATION
    if not compressed.is_file():
        raise SystemExit(f"{compressed} is missing after apt-get update; expected Debian bookworm's main "
                         "Translation-en")
    out = Path(tempfile.gettempdir()) / "Translation-en"
    with open(out, "wb") as f:
        subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(compressed)], check=True, stdout=f)
    return out


def parse_translation(path: Path) -> list[tuple[str, str, str]]:
    """(package, summary, long description) for every stanza of a Translation-en file."""
    entries = []
    for stanza in path.read_text(encoding="utf-8").split("\n\n"):
        package, summary, body, in_description = None, None, [], False
        for line in stanza.splitlines():
            if line.startswith("Package: "):
                package = line[len("Package: "):].strip()
            elif line.startswith("Description-en: "):
                summary, in_description = line[len("Description-en: "):].strip(), True
            elif in_description and line.startswith(" "):
                body.append("" if line.strip() == "." else line[1:].rstrip())
            else:
                in_description = False
        if package and summary and body:
            entries.append((package, summary, "\n".join(body).strip()))
    return entries


def select(entries: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    summaries, longs = {}, {}
    for _, summary, long in entries:
        summaries[summary.lower()] = summaries.get(summary.lower(), 0) + 1
        longs[long] = longs.get(long, 0) + 1
    unique = {}
    for package, summary, long in entries:
        if summaries[summary.lower()] == 1 and longs[long] == 1 and MIN_CHARS <= len(long) <= MAX_CHARS \
                and len(summary.split()) >= 3:
            unique[package] = (package, summary, long)
    picked = sorted(unique.values(), key=lambda e: name_hash(e[0]))[:DOCUMENTS]
    if len(picked) < DOCUMENTS:
        raise SystemExit(f"only {len(picked)} packages pass the filters; expected at least {DOCUMENTS}")
    return picked


def calibration_modules() -> set[str]:
    """Top-level modules the calibration set (build_set.py) takes text from: kept out of this set."""
    sys.path.insert(0, str(HERE))
    import build_set

    names = set(build_set.MODULES) | set(build_set.LONG_DOC_MODULES) | {
        "textwrap", "string", "bisect", "heapq", "statistics", "fractions", "shutil", "calendar"}
    return {n.split(".")[0] for n in names}


def first_sentence(doc: str) -> str:
    line = " ".join(doc.strip().split("\n\n")[0].split())
    return line.split(". ")[0].rstrip(".") + "."


def stdlib_functions() -> list[tuple[str, str, str]]:
    """(qualified name, docstring summary, source without the docstring) of the standard library's functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = calibration_modules() | {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
                                    "site-packages", "venv", "pydoc_data", "__phello__"}
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0].removesuffix(".py") in skip or any(p.startswith("test") for p in rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 2:
                continue
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            first = node.body[0]  # the docstring statement
            kept = lines[start:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
            code = textwrap.dedent("\n".join(kept)).strip()
            out.append((".".join(rel.with_suffix("").parts) + "." + node.name, first_sentence(doc), code))
    return out


def select_code(functions: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    summaries, sources = {}, {}
    for _, summary, code in functions:
        summaries[summary.lower()] = summaries.get(summary.lower(), 0) + 1
        sources[code] = sources.get(code, 0) + 1
    unique = {}
    for name, summary, code in functions:
        if summaries[summary.lower()] == 1 and sources[code] == 1 and len(summary.split()) >= 4 \
                and CODE_CHARS[0] <= len(code) <= CODE_CHARS[1]:
            unique[name] = (name, summary, code)
    picked = sorted(unique.values(), key=lambda e: name_hash(e[0]))[:CODE_DOCUMENTS]
    if len(picked) < CODE_DOCUMENTS:
        raise SystemExit(f"only {len(picked)} functions pass the filters; expected at least {CODE_DOCUMENTS}")
    return picked


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_part(folder: Path, picked: list[tuple[str, str, str]], prefix: str, test_queries: int) -> dict:
    (folder / "qrels").mkdir(parents=True)
    ids = [f"{prefix}{i:05d}" for i in range(len(picked))]  # neutral ids: a name could give the answer away
    write_jsonl(folder / "corpus.jsonl", [{"_id": f"d-{i}", "title": "", "text": long}
                                          for i, (_, _, long) in zip(ids, picked)])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q-{i}", "text": summary}
                                           for i, (_, summary, _) in zip(ids, picked)])
    test = set(sorted(ids, key=lambda i: name_hash("test:" + i))[:test_queries])
    for split in ("train", "test"):
        lines = ["query-id\tcorpus-id\tscore"] + [f"q-{i}\td-{i}\t1" for i in ids if (i in test) == (split == "test")]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return {"documents": len(ids), "queries": len(ids), "train_queries": len(ids) - len(test),
            "test_queries": len(test), "names": [p for p, _, _ in picked]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--translation", type=Path, help="a decompressed Translation-en file (default: apt-get update)")
    args = ap.parse_args()
    if OUT.exists():
        raise SystemExit(f"{OUT} exists; a new build is a new version (change VERSION) or remove it first")
    source = args.translation or fetch_translation()
    entries = parse_translation(source)
    picked = select(entries)
    tmp = Path(tempfile.mkdtemp(dir=HERE, prefix=f".labelled_{VERSION}.", suffix=".tmp"))
    part = write_part(tmp / "packages", picked, "pkg", TEST_QUERIES)
    packages = part.pop("names")
    functions = stdlib_functions()
    code_part = write_part(tmp / "code", select_code(functions), "fn", CODE_TEST_QUERIES)
    code_names = code_part.pop("names")
    in_release = LISTS / "deb.debian.org_debian_dists_bookworm_InRelease"
    release = next((ln[len("Date: "):] for ln in in_release.read_text(errors="replace").splitlines()
                    if ln.startswith("Date: ")), None) if in_release.is_file() else None
    manifest = {
        "version": VERSION,
        "format": "BEIR: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv",
        "parts": {"packages": {
            **part, "task": "package search: a Debian package's one-line summary -> its long description",
            "instruction": "Given a one-line summary of a software package, retrieve its full description",
            "source": {"file": TRANSLATION, "sha256": sha256_file(source), "release": release,
                       "stanzas": len(entries), "command": "apt-get update -o Acquire::Languages=en"},
            "selection": {"documents": DOCUMENTS, "test_queries": TEST_QUERIES, "long_chars": [MIN_CHARS, MAX_CHARS],
                          "order": "sha256 of the package name; test: sha256 of 'test:' + id",
                          "dropped": "summaries or long descriptions shared by two packages; summaries under 3 words"},
            "package_of_id": {f"pkg{i:05d}": p for i, p in enumerate(packages)},
        }, "code": {
            **code_part, "task": "code search: a docstring's first sentence -> the function's source without it",
            "instruction": "Given a description of what a Python function does, retrieve its source code",
            "source": {"python": platform.python_version(), "stdlib": "sysconfig stdlib path, *.py",
                       "functions": len(functions), "excluded": sorted(calibration_modules())},
            "selection": {"documents": CODE_DOCUMENTS, "test_queries": CODE_TEST_QUERIES, "source_chars": CODE_CHARS,
                          "order": "sha256 of the qualified name; test: sha256 of 'test:' + id",
                          "dropped": "shared summaries or sources; summaries under 4 words; test packages"},
            "function_of_id": {f"fn{i:05d}": n for i, n in enumerate(code_names)},
        }},
        "files": {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.rename(tmp, OUT)
    print(json.dumps({"output": str(OUT), "packages": part, "code": code_part}))


if __name__ == "__main__":
    main()
