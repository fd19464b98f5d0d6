"""Build the versioned calibration set from real text this machine ships: Python stdlib docstrings and source, and
the translated messages of Debian's GNU coreutils (.mo catalogues) in six languages.

    python calibration/build_set.py            # writes calibration/set_v1.jsonl and calibration/manifest.json

Deterministic: the same Python and Debian packages give the same file; the manifest records versions and sha256.
The committed set is what runs use; rebuilding is only needed to make a new version.
"""

from __future__ import annotations

import gettext
import hashlib
import importlib
import inspect
import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = "v1"
MODULES = ["json", "re", "os.path", "itertools", "functools", "collections", "string", "textwrap", "shutil",
           "math", "statistics", "datetime", "random", "heapq", "bisect", "csv", "pathlib", "fractions",
           "decimal", "calendar", "difflib", "base64", "zlib", "hashlib", "secrets", "uuid", "ipaddress"]
LONG_DOC_MODULES = ["argparse", "pickle", "decimal", "difflib", "doctest", "typing", "unittest", "threading"]
LANGS = ["de", "fr", "es", "ru", "ja", "zh_CN"]
TASKS = ["MSMARCO", "NQ", "STS", "QuoraRetrieval", "SciFact", "FiQA2018"]


def stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def documented_functions() -> list[tuple[str, str]]:
    out = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)) or getattr(obj, "__module__", "") is None:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and "\n" in doc.strip():
                out.append((f"{mod_name}.{name}", doc))
    return out


def first_sentence(doc: str) -> str:
    line = doc.strip().split("\n\n")[0].replace("\n", " ")
    return line.split(". ")[0].rstrip(".") + "."


def small_sources(limit: int) -> list[tuple[str, str]]:
    out = []
    for mod_name in ["textwrap", "string", "bisect", "heapq", "statistics", "fractions", "shutil", "calendar"]:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                try:
                    src = inspect.getsource(obj)
                except (OSError, TypeError):
                    continue
                if 200 < len(src) < 1500:
                    out.append((f"{mod_name}.{name} (source)", src))
    out.sort(key=lambda x: stable_hash(x[0]))
    return out[:limit]


def translations(per_lang: int) -> list[tuple[str, str, str]]:
    out = []
    for lang in LANGS:
        path = Path(f"/usr/share/locale/{lang}/LC_MESSAGES/coreutils.mo")
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        items = sorted((k, v) for k, v in catalog.items() if isinstance(k, str) and k and isinstance(v, str)
                       and 120 < len(v) < 900 and "%" not in v)
        items.sort(key=lambda kv: stable_hash(kv[0]))
        out += [(lang, f"coreutils.mo[{lang}]: {k[:40]!r}", v.strip()) for k, v in items[:per_lang]]
    return out


def build() -> list[dict]:
    rows: list[dict] = []

    def add(kind, text, source, lang="en", task=None, content="prose"):
        rid = f"{VERSION}-{len(rows):04d}"
        split = "tune" if stable_hash(source + text) % 2 == 0 else "heldout"
        rows.append({"id": rid, "kind": kind, "task": task, "text": text, "source": source, "lang": lang,
                     "content": content, "split": split})

    funcs = sorted(documented_functions(), key=lambda x: stable_hash(x[0]))[:72]
    for i, (name, doc) in enumerate(funcs):
        if i % 2 == 0:  # half the functions give a query (their summary), half a document (their docstring)
            add("query", first_sentence(doc), f"python {platform.python_version()} docstring of {name}",
                task=TASKS[i // 2 % len(TASKS)])
        else:
            add("document", doc, f"python {platform.python_version()} docstring of {name}",
                content="numbers" if sum(c.isdigit() for c in doc) > 5 else "prose")
    for name, src in small_sources(16):
        add("document", src, f"python {platform.python_version()} {name}", content="code")
    for lang, source, text in translations(6):
        add("document", text, source, lang=lang, content="translation")
    for mod_name in LONG_DOC_MODULES:
        doc = inspect.getdoc(importlib.import_module(mod_name)) or ""
        src = inspect.getsource(importlib.import_module(mod_name))
        text = (doc + "\n\n" + src)[:6000]  # long: well past 512 tokens
        add("document", text, f"python {platform.python_version()} {mod_name} module docstring + source head",
            content="long")
    return rows


def main() -> None:
    rows = build()
    set_path = HERE / f"set_{VERSION}.jsonl"
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    set_path.write_text(data, encoding="utf-8")
    counts: dict[str, int] = {}
    for r in rows:
        for key in (f"kind={r['kind']}", f"split={r['split']}", f"lang={r['lang']}", f"content={r['content']}"):
            counts[key] = counts.get(key, 0) + 1
    manifest = {
        "version": VERSION, "file": set_path.name, "sha256": hashlib.sha256(data.encode()).hexdigest(),
        "rows": len(rows), "counts": dict(sorted(counts.items())),
        "sources": {"python": f"CPython {platform.python_version()} standard library docstrings and source",
                    "coreutils": "Debian coreutils translations, /usr/share/locale/<lang>/LC_MESSAGES/coreutils.mo",
                    "languages": LANGS},
        "built_by": "python calibration/build_set.py", "python": sys.version.split()[0],
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
