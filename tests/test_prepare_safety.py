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

import prepare_data as prep
from dataset import load_meta
from finetune.formats.tokenfiles import reassemble
from finetune.prepare import writer
from helpers import REPO_ROOT, assert_one_line_error, load, make_corpus, reference_ids, run_main, snapshot


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
        result = run_main(prep.main, args, capsys)
        assert_one_line_error(result, f"in use by another run of prepare_data.py (PID {first.pid})")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / ".lock").exists() and list(out.glob(".train.bin.tmp-*"))  # what kill -9 leaves
    result = run_main(prep.main, args, capsys)
    assert result.returncode == 0, result.stderr
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
        result = run_main(prep.main, ["--input", folder, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                               "--block-size", 16], capsys)
    finally:
        signal.alarm(0)
    assert result.returncode == 0, result.stderr
    meta = load_meta(out)
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "b.txt"]
    tok = load(tiny_tokenizer_dir)
    expected = reference_ids(tok, text) + [tok.eos_token_id] + reference_ids(tok, "Linked text.") + [tok.eos_token_id]
    assert reassemble(out).tolist() == expected
    note = next(line for line in result.stderr.splitlines() if line.startswith("note:"))
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
    result = run_main(prep.main, ["--input", small, *args], capsys)
    assert result.returncode == 0, result.stderr
    before = snapshot(out)
    if small_disk is None:  # no tmpfs: the disk fills up when the token files are flushed
        def full(f):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(writer, "_sync", full)
    result = run_main(prep.main, ["--input", big, *args, "--overwrite"], capsys)
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "could not save train.bin, val.bin, meta.json in" in line and "HINT: free disk space" in line
    assert "No space left on device" in line or "Not enough free space" in line, line
    assert snapshot(out) == before  # earlier outputs intact, partial files and the lock gone


def test_bom_is_stripped_and_summary_gives_tokenizing_rate(tmp_path, tiny_tokenizer_dir, capsys):
    text = make_corpus(20_000, seed=5)
    book = tmp_path / "bom.txt"
    book.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    out = tmp_path / "out"
    result = run_main(prep.main, ["--input", book, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                                "--block-size", 16], capsys)
    assert result.returncode == 0, result.stderr
    tok = load(tiny_tokenizer_dir)
    assert reassemble(out).tolist() == reference_ids(tok, text) + [tok.eos_token_id]
    meta = load_meta(out)
    assert meta["sources"][0]["bom_stripped"] is True and meta["sources"][0]["bytes"] == len(text.encode()) + 3
    assert f"stripped a UTF-8 byte-order mark from the start of 1 file(s): {book}" in result.stdout
    first = result.stdout.splitlines()[0]
    assert " MB/s); " in first and "tokenized in" in first and "s in all, start-up included" in first
    assert "end to end" not in result.stdout


def test_sample_book_makes_the_quickstart_work(tmp_path, tiny_tokenizer_dir, capsys, monkeypatch):
    """A fresh clone has no book.txt: the error names --sample-book, which writes one that prepares."""
    monkeypatch.chdir(tmp_path)
    result = run_main(prep.main, ["--tokenizer", tiny_tokenizer_dir], capsys)
    assert_one_line_error(result, "--input book.txt does not exist", "python prepare_data.py --sample-book")
    result = run_main(prep.main, ["--sample-book"], capsys)
    assert result.returncode == 0, result.stderr
    import pydoc_data.topics as topics

    expected = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    assert (tmp_path / "book.txt").read_text(encoding="utf-8") == expected and len(expected) > 100_000
    assert "python prepare_data.py --input book.txt" in result.stdout
    result = run_main(prep.main, ["--sample-book"], capsys)  # the Quickstart line run twice
    assert result.returncode == 0 and "book.txt already holds the sample text" in result.stdout, result.stderr
    (tmp_path / "mine.txt").write_text("my own book", encoding="utf-8")
    result = run_main(prep.main, ["--sample-book", "mine.txt"], capsys)
    assert_one_line_error(result, "mine.txt already exists (and is not the sample)")
    assert (tmp_path / "mine.txt").read_text(encoding="utf-8") == "my own book"
    result = run_main(prep.main, ["--input", "book.txt", "--tokenizer", tiny_tokenizer_dir], capsys)
    assert result.returncode == 0, result.stderr
    assert load_meta(tmp_path / "data")["sources"][0]["bytes"] == len(expected.encode())


def test_every_problem_in_one_error(tmp_path, capsys):
    result = run_main(prep.main, ["--input", "x.txt", "--val-fraction", "2", "--block-size", "1", "--encoding", "nope",
                           "--text-field", ""], capsys)
    assert_one_line_error(result, "4 problems with the flags", "(1) --val-fraction", "(2) --block-size",
                          "(3) unknown --encoding", "(4) --text-field is empty")
    (tmp_path / "a.csv").write_text("", encoding="utf-8")
    (tmp_path / "out").write_text("a file", encoding="utf-8")
    result = run_main(prep.main, ["--input", tmp_path / "missing.txt", tmp_path / "a.csv", "--output-dir", tmp_path / "out"],
                          capsys)
    assert_one_line_error(result, "3 problems with the input", "missing.txt does not exist",
                          "a.csv is empty: no header row", "out is a file")


@pytest.mark.parametrize("link_to", ["notes", "fifo"])
def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, tiny_tokenizer_dir, capsys, link_to):
    """A data folder received from elsewhere with `.lock -> ../notes.txt`: the lock used to be opened with "a+",
    which followed the link, emptied the notes and wrote a PID into them. Now it is refused in one line."""
    out = tmp_path / "data"
    out.mkdir()
    target = tmp_path / "notes.txt"
    if link_to == "fifo":
        os.mkfifo(target)  # opening a FIFO blocks: the link must not even be opened
    else:
        target.write_text("my notes\n", encoding="utf-8")
    (out / ".lock").symlink_to("../notes.txt")
    book = tmp_path / "book.txt"
    book.write_text(make_corpus(20_000, seed=4), encoding="utf-8")
    signal.alarm(60)
    try:
        result = run_main(prep.main, ["--input", book, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                                      "--block-size", 16], capsys)
    finally:
        signal.alarm(0)
    assert_one_line_error(result, f"{out / '.lock'} is a symbolic link", "HINT: remove")
    assert (out / ".lock").is_symlink() and sorted(p.name for p in out.iterdir()) == [".lock"]
    if link_to == "notes":
        assert target.read_text(encoding="utf-8") == "my notes\n"
