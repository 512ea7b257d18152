"""The README is a front page and docs/ holds the rest: every page reachable, every local link alive,
and the flags described in one place only (each script's --help)."""
from __future__ import annotations

import ast
import re
import sys

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


# Imported by the scripts, but left out of requirements.txt on purpose: each is asked for by one error line
# naming its pip command when a feature that needs it is used (docs/installing.md lists them).
OPTIONAL_PACKAGES = {"peft": "--lora-r", "pyarrow": "Parquet inputs", "mlflow": "--report-to mlflow",
                     "trackio": "--report-to trackio", "wandb": "--report-to wandb"}
# Installed by a requirement (transformers requires huggingface_hub), so never missing.
INSTALLED_WITH_A_REQUIREMENT = {"huggingface_hub"}


def third_party_imports(files) -> set[str]:
    """The top-level names of the modules outside the standard library and this repository that `files` import."""
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    ours = {path.stem for path in REPO_ROOT.glob("*.py")} | {"finetune"}
    return {name for name in names if name not in sys.stdlib_module_names and name not in ours}


def requirement_names(requirements_file) -> set[str]:
    lines = (line.split("#")[0].strip() for line in requirements_file.read_text(encoding="utf-8").splitlines())
    return {re.split(r"[<>=!~\[ ;]", line)[0].lower() for line in lines if line and not line.startswith("-")}


def test_every_package_the_scripts_need_is_in_requirements_txt():
    """The Quickstart installs requirements.txt and then runs prepare, train, generate and export: every
    package those import, other than the optional ones named above, must be in it (issue 27, 15: gguf was
    only in requirements-dev.txt, so the Quickstart's export line failed after its own install)."""
    files = [*REPO_ROOT.glob("*.py"), *(REPO_ROOT / "finetune").rglob("*.py")]
    needed = third_party_imports(files) - set(OPTIONAL_PACKAGES) - INSTALLED_WITH_A_REQUIREMENT
    missing = sorted(name for name in needed if name.lower() not in requirement_names(REPO_ROOT / "requirements.txt"))
    assert missing == []
