"""prepare_data.py as an adversary and a new user meet it (issue 15): a lock on --output-dir, folder walks
that take regular files only, a full disk, a byte-order mark, the sample book, the summary, and every
problem of a validation in one error."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_prepare_data import load, reference_ids, snapshot
from test_prepare_records import assert_one_line_error, run

from conftest import REPO_ROOT, make_corpus
from dataset import load_meta
from finetune.prepare import writer
from finetune.tokenfiles import reassemble


def test_second_run_into_a_locked_output_dir_is_refused(tmp_path, tiny_tokenizer_dir, capsys):
    """Two runs into one --output-dir: the second is refused with the first one's PID. After kill -9 of
    the first, no stale lock is left: the next run goes ahead and removes the killed run's temporaries."""
    big = tmp_path / "big.txt"
    big.write_text(make_corpus(400_000, seed=3) * 20, encoding="utf-8")  # ~8 MB: the hf engine needs seconds
    out = tmp_path / "data"
    first = subprocess.Popen([sys.executable, str(REPO_ROOT / "prepare_data.py"), "--input", str(big), "--tokenizer",
                              str(tiny_tokenizer_dir), "--output-dir", str(out), "--engine", "hf",
                              "--num-workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list(out.glob(".train.bin.tmp-*")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "finished before the second run started"
        small = tmp_path / "small.txt"
        small.write_text(make_corpus(20_000, seed=4), encoding="utf-8")
        args = ["--input", small, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out, "--block-size", 16]
        code, _, stderr = run(args, capsys)
        assert_one_line_error(code, stderr, f"in use by another run of prepare_data.py (PID {first.pid})")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / ".lock").exists() and list(out.glob(".train.bin.tmp-*"))  # what kill -9 leaves
    code, _, stderr = run(args, capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_folder_walk_takes_regular_files_only(tmp_path, tiny_tokenizer_dir, capsys):
    """x.txt -> /dev/zero in an input folder (it grew to 13 GB RSS) is skipped and named, as are a FIFO,
    a broken link and a link to a folder; the regular files (and a link to one) are read."""
    folder = tmp_path / "books"
    folder.mkdir()
    text = make_corpus(20_000, seed=1)
    (tmp_path / "outside.txt").write_text("Linked text.", encoding="utf-8")
    (folder / "a.txt").write_text(text, encoding="utf-8")
    (folder / "b.txt").symlink_to(tmp_path / "outside.txt")
    (folder / "x.txt").symlink_to("/dev/zero")
    os.mkfifo(folder / "y.txt")
    (folder / "z.txt").symlink_to(tmp_path / "missing.txt")
    (tmp_path / "elsewhere").mkdir()
    (folder / "linked_dir").symlink_to(tmp_path / "elsewhere")
    (folder / "data").mkdir()  # an earlier output inside the folder: its meta.json is no record file
    (folder / "data" / "meta.json").write_text("{}", encoding="utf-8")
    (folder / "data" / "train.bin").write_bytes(b"")
    out = tmp_path / "out"
    signal.alarm(120)  # reading /dev/zero or the FIFO would never end
    try:
        code, _, stderr = run(["--input", folder, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                               "--block-size", 16], capsys)
    finally:
        signal.alarm(0)
    assert code == 0, stderr
    meta = load_meta(out)
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "b.txt"]
    tok = load(tiny_tokenizer_dir)
    expected = reference_ids(tok, text) + [tok.eos_token_id] + reference_ids(tok, "Linked text.") + [tok.eos_token_id]
    assert reassemble(out).tolist() == expected
    note = next(line for line in stderr.splitlines() if line.startswith("note:"))
    assert "skipped 5 entries" in note
    for fragment in ("meta.json (an output of prepare_data.py)", "x.txt (a link to a character device, not a regular file)",
                     "y.txt (a FIFO, not a regular file)",
                     "z.txt (a broken link)", "linked_dir (a link to a folder, not followed)"):
        assert fragment in note, note


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs when we may mount one (root); else None, and the test injects ENOSPC instead."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True) if os.geteuid() == 0 else None
    if done is None or done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_exit_4_and_keeps_earlier_outputs(tmp_path, small_disk, tiny_tokenizer_dir, capsys,
                                                                monkeypatch):
    out = (small_disk or tmp_path) / "data"
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text(make_corpus(20_000, seed=1), encoding="utf-8")
    big.write_text(make_corpus(2_000_000, seed=2), encoding="utf-8")  # ~620k tokens = 1.2 MB of uint16
    args = ["--tokenizer", tiny_tokenizer_dir, "--output-dir", out, "--block-size", 16]
    code, _, stderr = run(["--input", small, *args], capsys)
    assert code == 0, stderr
    before = snapshot(out)
    if small_disk is None:  # no tmpfs: the disk fills up when the token files are flushed
        def full(f):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(writer, "_sync", full)
    code, _, stderr = run(["--input", big, *args, "--overwrite"], capsys)
    assert code == 4, stderr
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "could not save train.bin, val.bin, meta.json in" in line and "HINT: free disk space" in line
    assert "No space left on device" in line or "Not enough free space" in line, line
    assert snapshot(out) == before  # earlier outputs intact, partial files and the lock gone


def test_bom_is_stripped_and_summary_gives_tokenizing_rate(tmp_path, tiny_tokenizer_dir, capsys):
    text = make_corpus(20_000, seed=5)
    book = tmp_path / "bom.txt"
    book.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    out = tmp_path / "out"
    code, stdout, stderr = run(["--input", book, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                                "--block-size", 16], capsys)
    assert code == 0, stderr
    tok = load(tiny_tokenizer_dir)
    assert reassemble(out).tolist() == reference_ids(tok, text) + [tok.eos_token_id]
    meta = load_meta(out)
    assert meta["sources"][0]["bom_stripped"] is True and meta["sources"][0]["bytes"] == len(text.encode()) + 3
    assert f"stripped a UTF-8 byte-order mark from the start of 1 file(s): {book}" in stdout
    first = stdout.splitlines()[0]
    assert " MB/s); " in first and "tokenized in" in first and "s in all, start-up included" in first
    assert "end to end" not in stdout


def test_sample_book_makes_the_quickstart_work(tmp_path, tiny_tokenizer_dir, capsys, monkeypatch):
    """A fresh clone has no book.txt: the error names --sample-book, which writes one that prepares."""
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run(["--tokenizer", tiny_tokenizer_dir], capsys)
    assert_one_line_error(code, stderr, "--input book.txt does not exist", "python prepare_data.py --sample-book")
    code, stdout, stderr = run(["--sample-book"], capsys)
    assert code == 0, stderr
    import pydoc_data.topics as topics

    expected = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    assert (tmp_path / "book.txt").read_text(encoding="utf-8") == expected and len(expected) > 100_000
    assert "python prepare_data.py --input book.txt" in stdout
    code, stdout, stderr = run(["--sample-book"], capsys)  # the Quickstart line run twice
    assert code == 0 and "book.txt already holds the sample text" in stdout, stderr
    (tmp_path / "mine.txt").write_text("my own book", encoding="utf-8")
    code, _, stderr = run(["--sample-book", "mine.txt"], capsys)
    assert_one_line_error(code, stderr, "mine.txt already exists (and is not the sample)")
    assert (tmp_path / "mine.txt").read_text(encoding="utf-8") == "my own book"
    code, _, stderr = run(["--input", "book.txt", "--tokenizer", tiny_tokenizer_dir], capsys)
    assert code == 0, stderr
    assert load_meta(tmp_path / "data")["sources"][0]["bytes"] == len(expected.encode())


def test_every_problem_in_one_error(tmp_path, capsys):
    code, _, stderr = run(["--input", "x.txt", "--val-fraction", "2", "--block-size", "1", "--encoding", "nope",
                           "--text-field", ""], capsys)
    assert_one_line_error(code, stderr, "4 problems with the flags", "(1) --val-fraction", "(2) --block-size",
                          "(3) unknown --encoding", "(4) --text-field is empty")
    (tmp_path / "a.csv").write_text("", encoding="utf-8")
    (tmp_path / "out").write_text("a file", encoding="utf-8")
    code, _, stderr = run(["--input", tmp_path / "missing.txt", tmp_path / "a.csv", "--output-dir", tmp_path / "out"],
                          capsys)
    assert_one_line_error(code, stderr, "3 problems with the input", "missing.txt does not exist",
                          "a.csv is empty: no header row", "out is a file")
