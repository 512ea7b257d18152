"""What a finished run leaves on disk (issue 23 item 7): the output folder after a short full fine-tuning of
GPT-2 124M (random weights), with this checkout's script and, optionally, another checkout's, side by side.

    git worktree add /tmp/before 40ad87d~1                     # the commit before identical files were shared
    python bench/run_folder_size.py --baseline-repo /tmp/before

Each run: 30 steps evaluated every 10, saved at the end only (the default --save-every 500), block 64 x batch 1,
fp32, lr 1e-4: the last evaluation is the best, so best/, checkpoint-30 and the final model hold the same
weights. Reported per run: the bytes the folder's files take on disk, a file hard-linked several times counted
once (what `du -s` says), and the sum of the file sizes (what copying the folder elsewhere takes).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_model_dir, write_data_dir  # noqa: E402


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes stored, each inode once; sum of the file sizes)."""
    seen, stored, apparent = set(), 0, 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            apparent += st.st_size
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                stored += st.st_blocks * 512
    return stored, apparent


def run(repo: Path, model_dir: Path, data_dir: Path, out: Path, steps: int) -> None:
    cmd = [sys.executable, str(repo / "finetune_generative.py"), "--model", str(model_dir), "--data-dir", str(data_dir),
           "--output-dir", str(out), "--max-steps", str(steps), "--eval-every", "10",
           "--block-size", "64", "--batch-size", "1", "--precision", "fp32", "--lr", "1e-4", "--warmup-steps", "0",
           "--eval-batches", "4", "--num-workers", "0"]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{repo}: exit {done.returncode}\n{done.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-repo", type=Path, help="another checkout to run the same command with")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workdir", type=Path, default=None, help="where models, data and runs go (default: a temp dir)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="folder-size-"))
    model_dir = build_model_dir("gpt2", work)
    data_dir = write_data_dir(work / "data", model_dir, train_tokens=64 * 200, val_tokens=64 * 8)
    repos = {"this checkout": REPO, **({"baseline": args.baseline_repo.resolve()} if args.baseline_repo else {})}
    print(f"GPT-2 124M, {args.steps} steps, --eval-every 10, block 64 x batch 1, fp32")
    for name, repo in repos.items():
        out = work / f"run-{name.replace(' ', '-')}"
        run(repo, model_dir, data_dir, out, args.steps)
        stored, apparent = folder_bytes(out)
        entries = sorted(p.name for p in out.iterdir())
        print(f"{name:>14}: {stored / 1e6:,.1f} MB on disk, {apparent / 1e6:,.1f} MB of files ({repo}); "
              f"holds {', '.join(entries)}")
    if not args.workdir:
        print(f"(runs left in {work})")
    os.sync()


if __name__ == "__main__":
    main()
