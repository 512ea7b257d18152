"""The plan of the code, checked: finetune/ is cut into layers (the rooms its __init__.py lists, bottom up),
and inside every package a module imports only the rooms listed before it in that package's docstring, so a
layer imports only the layers below it, there is no circle, and the lists are the architecture drawing;
every script's --help loads without torch."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "finetune"
SCRIPTS = sorted(p.name for p in REPO_ROOT.glob("*.py") if p.name not in {"dataset.py"})
ROOM = re.compile(r"^    (\w+)/?\s", re.MULTILINE)


def room_order(package_dir) -> list[str]:
    """The rooms of a package in the order its docstring lists them."""
    doc = ast.get_docstring(ast.parse((package_dir / "__init__.py").read_text(encoding="utf-8")))
    return ROOM.findall(doc)


def imported_modules(path, package: str) -> set[str]:
    """Every finetune module `path` imports, at the top or inside a function, as a dotted name."""
    tree, names = ast.parse(path.read_text(encoding="utf-8")), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("finetune")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.startswith("finetune"):
                names.add(module)
                names |= {f"{module}.{alias.name}" for alias in node.names}  # `from finetune import chat`
    return names


def rank_in(package_dir, dotted: str, package: str) -> int | None:
    """Where the room a dotted name falls in stands in `package`'s list (None: not one of its rooms)."""
    rest = dotted[len(package) + 1:] if dotted.startswith(package + ".") else None
    if not rest:
        return None
    rooms = room_order(package_dir)
    head = rest.split(".")[0]
    return rooms.index(head) if head in rooms else None


def packages():
    """finetune/ (whose rooms are the layers) and every package inside it, at any depth."""
    for init in sorted(PACKAGE.glob("**/__init__.py")):
        yield init.parent, ".".join(init.parent.relative_to(REPO_ROOT).parts)


@pytest.mark.parametrize("package_dir,package", list(packages()), ids=lambda v: str(v).rsplit("/", 1)[-1])
def test_every_module_is_listed_and_imports_only_the_ones_before_it(package_dir, package):
    rooms = room_order(package_dir)
    modules = sorted(p.stem for p in package_dir.glob("*.py") if p.stem != "__init__")
    subpackages = sorted(p.parent.name for p in package_dir.glob("*/__init__.py"))
    assert sorted(rooms) == sorted(modules + subpackages), f"{package}/__init__.py's list vs the files"
    upward = []
    for path in sorted(package_dir.glob("**/*.py")):
        relative = path.relative_to(package_dir).with_suffix("")
        if relative.name == "__init__" and len(relative.parts) == 1:
            continue
        own = rooms.index(relative.parts[0])
        module_package = ".".join([package, *relative.parts[:-1]])
        for dotted in imported_modules(path, module_package):
            rank = rank_in(package_dir, dotted, package)
            if rank is not None and rank > own:
                upward.append(f"{path.relative_to(REPO_ROOT)} imports {dotted} (listed after it)")
    assert upward == []


def test_the_package_never_imports_a_script():
    scripts = {name.removesuffix(".py") for name in SCRIPTS} | {"dataset"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(REPO_ROOT)}: {n}" for n in names if n in scripts]
    assert offenders == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_loads_without_torch(script):
    """`--help` is the first thing a user runs: it must not wait for torch (seconds) or need it."""
    path = str(REPO_ROOT / script)
    blocker = (f"import sys, runpy; sys.modules['torch'] = None; sys.argv = [{script!r}, '--help']; "
               f"runpy.run_path({path!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "--" in result.stdout


def test_importing_the_package_changes_no_global_state():
    """Nothing is registered or filtered at import time: importing every room leaves the warnings filters and
    transformers' attention registry as they were."""
    code = ("import warnings, pkgutil, importlib, finetune\n"
            "from transformers import AttentionInterface\n"
            "filters, names = list(warnings.filters), set(AttentionInterface._global_mapping)\n"
            "for info in pkgutil.walk_packages(finetune.__path__, 'finetune.'):\n"
            "    importlib.import_module(info.name)\n"
            "assert warnings.filters == filters, [f for f in warnings.filters if f not in filters]\n"
            "assert set(AttentionInterface._global_mapping) == names\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
