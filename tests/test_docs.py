"""The README is a front page and docs/ holds the rest: every page reachable, every local link alive,
and the flags described in one place only (each script's --help)."""
from __future__ import annotations

import re

from helpers import REPO_ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def local_links(markdown_file):
    text = markdown_file.read_text(encoding="utf-8")
    return [target for target in LINK.findall(text) if "://" not in target]


def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = REPO_ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 300
    linked = {(REPO_ROOT / target).resolve() for target in local_links(readme)}
    pages = sorted((REPO_ROOT / "docs").rglob("*.md"))
    assert pages, "docs/ has no pages"
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_every_local_link_in_the_docs_exists():
    files = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    broken = [f"{f.relative_to(REPO_ROOT)} -> {target}" for f in files for target in local_links(f)
              if not (f.parent / target).exists()]
    assert broken == []


def test_flags_have_one_source_the_scripts_help():
    """A flag table beside --help drifts; the docs point at --help instead."""
    files = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    tables = [f.name for f in files if re.search(r"^\| flag \|", f.read_text(encoding="utf-8"), re.MULTILINE)]
    assert tables == []
