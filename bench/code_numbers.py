"""The plan of a checkout in numbers (docs/development.md quotes them): modules per package, imports inside
functions (torch among them), and the places outside the plug-ins that read --lora-r / --fsdp or sniff chat data.

    python bench/code_numbers.py .             # this checkout
    python bench/code_numbers.py /tmp/old      # another one (git worktree add /tmp/old COMMIT)

Outside the plug-ins means: not in finetune/train/strategies/, lora.py, fsdp.py or plan.py (whose estimates are
arithmetic on the settings) for the LoRA and FSDP settings; not in finetune/train/objectives/, chat.py, packing.py or
pairs.py for chat data.
"""
import ast
import collections
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1])
pkg = root / "finetune"
per_pkg = collections.Counter()
inner = inner_torch = 0
for p in pkg.rglob("*.py"):
    if p.name != "__init__.py":
        per_pkg[str(p.parent.relative_to(root))] += 1
    tree = ast.parse(p.read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    inner += 1
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    inner_torch += any(n == "torch" for n in names)
plugin_files = {"lora.py", "fsdp.py"}
pat = {"lora_r": re.compile(r"\bcfg\.lora_r\b"),
       "fsdp": re.compile(r"\bcfg\.fsdp\b"),
       "chat": re.compile(r'"position_ids" in (batch|window)|"chat" in meta|is_chat\(|run\.chat\b|meta\.get\("chat"\)')}
files = [*root.glob("*.py"), *pkg.rglob("*.py")]
for name, rx in pat.items():
    hits = []
    for p in files:
        rel = p.relative_to(root)
        if name in ("lora_r", "fsdp") and (p.name in plugin_files or "strategies" in rel.parts or p.name == "plan.py"):
            continue
        if name == "chat" and ("objectives" in rel.parts or p.name in ("chat.py", "packing.py", "pairs.py")):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if rx.search(line) and not line.lstrip().startswith("#"):
                hits.append(f"{rel}:{i}")
    print(f"branches on {name} outside its plug-ins: {len(hits)}", hits[:12])
print("modules per package:", dict(per_pkg))
print("imports inside functions:", inner, "of them torch:", inner_torch)
