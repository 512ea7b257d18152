"""prepare_data.py of an earlier commit and of the working tree, on the same inputs: the outputs byte for byte.

    python bench/prepare_identity.py                        # against 47a7494 (before the split), 2 MB
    python bench/prepare_identity.py --commit HEAD~3 --mb 20
    python bench/prepare_identity.py --new split           # a commit on both sides (the tree can change meanwhile)

The commit is checked out with `git worktree add --detach` into a temporary folder (removed at the end).
Corpora, written once and given to both checkouts under the same absolute paths: one text file of
--mb MB (the Python documentation bundled with CPython, repeated), a folder of text files (.txt and .md),
paragraphs of it as records in JSON lines, a JSON array, CSV and TSV, and pairs of paragraphs as chat
records (user, assistant; skipped when the commit has no chat records). Each corpus runs with each engine:
--engine tiktoken and --engine hf with the GPT-2 tokenizer in ../shared/gpt2-tokenizer (when present),
and both with a tiny byte-level BPE built as the tests build theirs. train.bin, val.bin, meta.json (and
chat's mask files) must be equal byte for byte (meta.json names only the inputs' and the tokenizer's paths, and those are
the same for both), except meta.json's "settings": the record of the flags (for --config) that a newer
prepare_data.py adds, which names each side's own --output-dir. Every flag of the earlier `prepare_data.py --help`
must still be in the newer one. Exit status 1 when anything differs.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

OUTPUTS = ("train.bin", "val.bin", "meta.json")
MASKS = ("train.mask.bin", "val.mask.bin")  # chat records


def write_corpora(folder: Path, mb: float) -> dict[str, list[str]]:
    """name -> the --input paths of that corpus."""
    import pydoc_data.topics as topics

    doc = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    text = (doc * (int(mb * 1e6) // len(doc.encode()) + 1))[:int(mb * 1e6)]
    (folder / "book.txt").write_text(text, encoding="utf-8")
    books = folder / "books"
    (books / "part").mkdir(parents=True)
    for i, name in enumerate(("a.txt", "part/b.md", "part/c.txt")):
        (books / name).write_text(doc[i * 150_000:(i + 1) * 150_000], encoding="utf-8")
    paragraphs = [p for p in doc.split("\n\n") if p.strip()]
    with open(folder / "rows.jsonl", "w", encoding="utf-8") as f:
        for i, p in enumerate(paragraphs):
            f.write(json.dumps({"id": i, "text": p}, ensure_ascii=False) + "\n")
    for name, delimiter in (("rows.csv", ","), ("rows.tsv", "\t")):
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["id", "text"])
            writer.writerows(enumerate(paragraphs))
    with open(folder / "rows.json", "w", encoding="utf-8") as f:
        json.dump([{"id": i, "text": p} for i, p in enumerate(paragraphs)], f, indent=1, ensure_ascii=False)
    with open(folder / "chats.jsonl", "w", encoding="utf-8") as f:
        for i in range(0, len(paragraphs) - 1, 2):
            messages = [{"role": "user", "content": paragraphs[i]}, {"role": "assistant", "content": paragraphs[i + 1]}]
            f.write(json.dumps({"id": i, "messages": messages}, ensure_ascii=False) + "\n")
    return {"text": [str(folder / "book.txt")], "folder": [str(books)],
            "jsonl": [str(folder / "rows.jsonl")], "json": [str(folder / "rows.json")],
            "csv": [str(folder / "rows.csv")], "tsv": [str(folder / "rows.tsv")],
            "chat": [str(folder / "chats.jsonl")]}


def run_prepare(checkout: Path, args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(checkout / "prepare_data.py"), *args], cwd=checkout, env=env,
                          capture_output=True, text=True)


def compare(name: str, before: Path, after: Path) -> list[str]:
    """What differs between two output folders (empty: byte-identical)."""
    files = [*OUTPUTS, *(m for m in MASKS if (before / m).exists() or (after / m).exists())]
    return [f"{name}: {file} differs" for file in files
            if not (before / file).exists() or not (after / file).exists()
            or compared_bytes(before / file) != compared_bytes(after / file)]


def compared_bytes(path: Path) -> bytes:
    """The file's bytes; meta.json's without its "settings" (the flags' record, naming the run's own folder),
    written back as prepare_data.py writes meta.json (tokenfiles.write_meta)."""
    if path.name != "meta.json":
        return path.read_bytes()
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.pop("settings", None)
    return (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def flags_in(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="47a7494", help="the commit to compare with (default: %(default)s)")
    parser.add_argument("--new", default=None, metavar="COMMIT",
                        help="compare with this commit's checkout instead of the working tree")
    parser.add_argument("--mb", type=float, default=2.0, help="size of the text-file corpus (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prepare-identity-") as tmp:
        work = Path(tmp)
        checkouts = {"before": (work / "before", args.commit)}
        if args.new:
            checkouts["after"] = (work / "after", args.new)
        for folder, commit in checkouts.values():
            subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(folder), commit],
                           check=True)
        try:
            return compare_checkouts(work / "before", work / "after" if args.new else REPO_ROOT, work, args)
        finally:
            for folder, _ in checkouts.values():
                subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(folder)], check=True)


def compare_checkouts(old: Path, new: Path, work: Path, args) -> int:
    from conftest import build_tiny_tokenizer

    (work / "corpora").mkdir()
    corpora = write_corpora(work / "corpora", args.mb)
    tokenizers = {"tiny": work / "tiny-tokenizer"}
    build_tiny_tokenizer(tokenizers["tiny"])
    gpt2 = REPO_ROOT.parent / "shared" / "gpt2-tokenizer"
    if gpt2.is_dir():
        tokenizers["gpt2"] = gpt2
    else:
        print(f"note: {gpt2} is absent: the GPT-2 tokenizer is not compared")

    problems = []
    helps = [run_prepare(checkout, ["--help"], work / "cache").stdout for checkout in (old, new)]
    lost = flags_in(helps[0]) - flags_in(helps[1])
    if lost:
        problems.append(f"--help lost {', '.join(sorted(lost))}:\n" + "".join(difflib.unified_diff(
            helps[0].splitlines(True), helps[1].splitlines(True), "before", "after")))
    if "--chat-format" not in helps[0]:
        print(f"note: {args.commit} has no chat records: the chat corpus is not compared")
        del corpora["chat"]
    for tok_name, tok_path in tokenizers.items():
        for engine in ("tiktoken", "hf"):
            for corpus, inputs in corpora.items():
                name = f"{corpus} / {tok_name} / --engine {engine}"
                outs = []
                for label, checkout in (("before", old), ("after", new)):
                    out = work / "out" / label / f"{corpus}-{tok_name}-{engine}"
                    result = run_prepare(checkout, ["--input", *inputs, "--tokenizer", str(tok_path), "--engine",
                                                    engine, "--output-dir", str(out), "--block-size", "64",
                                                    "--num-workers", str(args.num_workers)], work / f"cache-{label}")
                    if result.returncode != 0:
                        problems.append(f"{name}: {label} exited {result.returncode}: {result.stderr[-2000:]}")
                        break
                    outs.append(out)
                if len(outs) == 2:
                    found = compare(name, *outs)
                    size = sum(f.stat().st_size for f in outs[1].iterdir())
                    print(f"{name:38s} {'identical' if not found else 'DIFFERENT'} ({size:,} bytes of output)")
                    problems += found
    for problem in problems:
        print(problem)
    print("byte-identical" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
