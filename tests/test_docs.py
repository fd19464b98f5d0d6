"""The README and docs/: every relative link resolves (files and #anchors), and every `lowmem-e5` command they show
parses with the real CLI parser (its flags exist, its choices are valid)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lowmem_e5.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```bash\n(.*?)```", re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return found


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]


def test_docs_exist_and_each_page_opens_with_its_question():
    names = {p.name for p in PAGES}
    assert {"README.md", "quality.md", "serving.md", "cluster.md", "adapters.md", "performance.md",
            "design.md"} <= names
    for page in PAGES[1:]:
        title, _, rest = page.read_text().partition("\n\n")
        question = rest.partition("\n\n")[0]  # the paragraph under the title
        assert title.startswith("# ") and question.startswith("*") and question.rstrip().endswith("?*"), page.name


def test_readme_fits_on_two_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_readme_links_every_docs_page():
    linked = {Path(t.partition("#")[0]).name for t in relative_links(ROOT / "README.md")}
    assert {p.name for p in PAGES[1:]} <= linked


def shown_commands(page: Path) -> list[list[str]]:
    """`lowmem-e5 ...` commands in the page's bash blocks: continuation lines joined, `&&` chains split, comments
    dropped."""
    commands = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["lowmem-e5"]:
                    commands.append(words[1:])
    return commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_shown_command_parses(page: Path):
    parser = build_parser()
    for argv in shown_commands(page):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code != 0:  # --version / --help exit 0
                pytest.fail(f"{page.name}: lowmem-e5 {' '.join(argv)} does not parse")


def test_the_readme_tour_shows_encode_serve_compare_and_plan():
    shown = {argv[0] for argv in shown_commands(ROOT / "README.md")}
    assert {"encode", "serve", "compare", "plan"} <= shown
