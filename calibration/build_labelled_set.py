"""Build the labelled retrieval set (BEIR format) from real text this project did not write.

Part `packages` (package search): Debian bookworm's package descriptions, as `apt-get update` fetches them
(Translation-en of main). The query is a package's one-line summary, its one relevant document the package's long
description (paragraph marks ` .` become blank lines); the package name is left out of both, so the name cannot
give the answer away. Packages whose summary or long description is shared with another package are dropped
(no unique answer), as are long descriptions under 200 or over 1,000 characters (one-liners; changelogs).
Disjoint train and test queries; one corpus holds the documents of both, so test queries search past their own.

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
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = "v1"
OUT = HERE / f"labelled_{VERSION}"
LISTS = Path("/var/lib/apt/lists")
TRANSLATION = "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4"
DOCUMENTS = 1600  # corpus size: what a CPU grid of modes can embed in minutes per mode
TEST_QUERIES = 300
MIN_CHARS, MAX_CHARS = 200, 1000


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
        raise SystemExit(f"{compressed} is missing after apt-get update; expected Debian bookworm's main Translation-en")
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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_part(folder: Path, picked: list[tuple[str, str, str]]) -> dict:
    (folder / "qrels").mkdir(parents=True)
    ids = [f"pkg{i:05d}" for i in range(len(picked))]  # neutral ids: the package name would give the answer away
    write_jsonl(folder / "corpus.jsonl", [{"_id": f"d-{i}", "title": "", "text": long}
                                          for i, (_, _, long) in zip(ids, picked)])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q-{i}", "text": summary}
                                           for i, (_, summary, _) in zip(ids, picked)])
    test = set(sorted(ids, key=lambda i: name_hash("test:" + i))[:TEST_QUERIES])
    for split in ("train", "test"):
        lines = ["query-id\tcorpus-id\tscore"] + [f"q-{i}\td-{i}\t1" for i in ids if (i in test) == (split == "test")]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return {"documents": len(ids), "queries": len(ids), "train_queries": len(ids) - len(test),
            "test_queries": len(test), "packages": [p for p, _, _ in picked]}


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
    part = write_part(tmp / "packages", picked)
    packages = part.pop("packages")
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
        }},
        "files": {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.rename(tmp, OUT)
    print(json.dumps({"output": str(OUT), **{k: v for k, v in part.items()}}))


if __name__ == "__main__":
    main()
