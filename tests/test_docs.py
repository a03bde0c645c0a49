"""Documentation code cannot rot: every snippet the docs include is run here."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
INCLUDE = re.compile(r'--8<--\s+"([^"]+)"')


def _included() -> list[str]:
    found = set()
    for page in DOCS.rglob("*.md"):
        found.update(INCLUDE.findall(page.read_text()))
    return sorted(found)


def test_every_include_exists():
    missing = []
    for include in _included():
        path, _, section = include.partition(":")  # "file.md:name" includes one marked section
        if not (ROOT / path).is_file() or (section and f"[start:{section}]" not in (ROOT / path).read_text()):
            missing.append(include)
    assert not missing, f"docs include missing files or sections: {missing}"


@pytest.mark.parametrize("path", [p for p in _included() if p.startswith("docs/snippets/")])
def test_included_snippet_runs(path):
    runpy.run_path(str(ROOT / path), run_name="__main__")


def test_every_snippet_is_included():
    unused = {f"docs/snippets/{p.name}" for p in (DOCS / "snippets").glob("*.py")} - set(_included())
    assert not unused, f"snippets not included by any page: {sorted(unused)}"
