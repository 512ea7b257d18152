"""prepare_data.py: exact tokens, safe cuts, the split, dtypes, atomic outputs and clean errors.

End-to-end cases run the script as a user does (run_script); fine-grained ones import it.
The reference for "exact tokens" is always AutoTokenizer(text, add_special_tokens=False) on a
whole file, followed by one end-of-text token.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import prepare_data as prep
from dataset import DataError, load_meta
from finetune.core.errors import UserError
from finetune.formats.tokenfiles import read_split, reassemble
from finetune.prepare import cuts, engines, pipeline, recorded, split, stream
from helpers import (
    REPO_ROOT,
    SHARED_GPT2_TOKENIZER,
    assert_one_line_error,
    load,
    make_corpus,
    reference_ids,
    run_main,
    run_script,
    snapshot,
)

needs_gpt2 = pytest.mark.skipif(not (SHARED_GPT2_TOKENIZER / "tokenizer.json").is_file(),
                                reason="GPT-2 tokenizer not present at ../shared/gpt2-tokenizer")


# -----------------------------------------------------------------------------
# Helpers and extra tokenizers


def with_spec(path):
    tok = load(path)
    return tok, engines.tokenizer_spec(tok)


def text_of(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # read_text() would turn \r\n into \n


ADVERSARIAL = [
    "the", "The", "whale", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\r\n", "\r", "\t", " \t", "\t\n",
    "\u00a0", "\u3000", "\u2028", "\x1c", "\x85", "'s", "'", "'ll", "’", "don't", "I'LL", "123", "4.5",
    "½", "²", "é", "e\u0301", "東京", "こんにちは", "🙂", "🚀", "👩‍👩‍👧",
    ".", "...", "!?", "--", "(", ")",
    "\"", "naïve", "über", "x" * 40, "<|endoftext|>",
]


# Visible characters only (the class-change rule): JSON, contractions next to apostrophes and
# punctuation, digits of other kinds, combining marks, a letter Python 3.11 does not know yet
# (U+11F04, Kawi, Unicode 15), an unassigned code point, the added token.
NO_WHITESPACE = [
    *(s for s in ADVERSARIAL if not any(ch.isspace() for ch in s)),
    '{"', '":', '",', '":"', "[1,2]", "{}", "null", "true", "-0.5e+10", "\\u00e9", "\\n", "_", "x_1", "__init__",
    "'s", "''", "'re", "'ve", "'d", "'m", "'t", "'S", "’s", "'1", "'東", "a'", "1'", "!'", "ll", "re", "s",
    "٣٤", "①", "Ⅻ", "x²", "3½", "a\u0301", "\u200b", "\u180e", "\U00011f04", "\U0001fae8", "\U000e0001",
    "。", "，", "東京タワー", "дом", "<|endoftext|>", "<|", "|>", "<", "endoftext",
]


def adversarial_text(n_chars: int, seed: int = 0, parts_from=ADVERSARIAL) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        part = rng.choice(parts_from)
        parts.append(part)
        size += len(part)
    return "".join(parts)


def chunked_ids(path: Path, tok, engine, chunk_chars: int, encoding="utf-8"):
    cutter = cuts.make_cutter(tok, engines.tokenizer_spec(tok), engine)
    pieces = list(stream.Chunker([path], [{}], encoding, cutter, chunk_chars=chunk_chars))
    ids = np.concatenate([engine.encode(p.text) for p in pieces])
    return pieces, ids


@pytest.fixture(scope="session")
def metaspace_tokenizer_dir(tmp_path_factory) -> Path:
    """A SentencePiece-style tokenizer (Metaspace pre-tokenizer): the GPT-2 cut proof does not apply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    corpus = make_corpus(60_000, seed=123)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    tk.train_from_iterator([corpus[i:i + 1000] for i in range(0, len(corpus), 1000)], trainer)
    out = tmp_path_factory.mktemp("metaspace_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(out)
    return out


def build_wordlevel(out: Path, words_high: bool) -> Path:
    """A word-level tokenizer with more than 65,536 entries; the corpus words sit above or below 65,536."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for seed in (1, 2, 123) for w, _ in pre.pre_tokenize_str(make_corpus(100_000, seed=seed))})
    fillers = [f"<filler{i}>" for i in range(66_000)]
    ordered = ["<|endoftext|>", "[UNK]"] + (fillers + words if words_high else words + fillers)
    vocab = {w: i for i, w in enumerate(ordered)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_dir):
    """One end-to-end run over a folder of two documents (plus files that must be ignored)."""
    root = tmp_path_factory.mktemp("prepared")
    books = root / "books"
    (books / "part2").mkdir(parents=True)
    (books / "a.txt").write_text(make_corpus(30_000, seed=11), encoding="utf-8")
    last_line = "\r\nLast line\twith tabs  "
    (books / "part2" / "b.md").write_text(make_corpus(25_000, seed=12) + last_line, encoding="utf-8")
    (books / ".hidden.txt").write_text("never read", encoding="utf-8")
    (books / "notes.bin").write_bytes(b"\xff\xfe not text")
    out = root / "data"
    result = run_script("prepare_data.py", "--input", books, "--tokenizer", tiny_tokenizer_dir,
                        "--output-dir", out, "--block-size", 64, "--num-workers", 1)
    assert result.returncode == 0, result.stderr
    return {"root": root, "out": out, "docs": [books / "a.txt", books / "part2" / "b.md"], "result": result}


# -----------------------------------------------------------------------------
# End to end: exact tokens, round trip, split placement, summary


def test_round_trip_reproduces_input(prepared, tiny_tokenizer_dir):
    out, docs = prepared["out"], prepared["docs"]
    meta = load_meta(out)
    tok = load(tiny_tokenizer_dir)
    texts = [text_of(p) for p in docs]
    assert [s["path"] for s in meta["sources"]] == [str(p) for p in docs]  # sorted, hidden/.bin skipped
    expected = [i for text in texts for i in reference_ids(tok, text) + [tok.eos_token_id]]
    stream = reassemble(out)
    assert stream.tolist() == expected
    eos_at = np.flatnonzero(stream == tok.eos_token_id)
    assert len(eos_at) == len(docs)
    decoded = [tok.decode(stream[a + 1:b].tolist(), clean_up_tokenization_spaces=False)
               for a, b in zip([-1, *eos_at[:-1]], eos_at)]
    assert decoded == texts
    assert meta["max_token_id"] == int(stream.max())
    assert meta["eos_token_id"] == tok.eos_token_id and meta["vocab_size"] == len(tok)
    for source, path in zip(meta["sources"], docs):
        assert source["bytes"] == path.stat().st_size and len(source["sha256"]) == 64


def test_validation_is_from_the_middle_and_summary_is_printed(prepared):
    meta = load_meta(prepared["out"])
    split = meta["split"]
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert split["policy"] == "val-ranges" and split["seed"] == 1337 and split["val_fraction"] == 0.1
    first, last = split["val_ranges"][0], split["val_ranges"][-1]
    assert first["train_tokens_before"] > 0  # not the head
    assert last["train_tokens_before"] < meta["splits"]["train"]["tokens"]  # not the tail
    assert 0.05 < meta["splits"]["val"]["tokens"] / total < 0.15
    stdout = prepared["result"].stdout
    for fragment in ("chars/token", "optimizer steps", "blocks", "train", "val"):
        assert fragment in stdout
    # stderr is a pipe here, as in a log file: plain lines, no bar redrawn with carriage returns (issue 27 #22).
    stderr = prepared["result"].stderr
    assert "\r" not in stderr and "B/s" not in stderr
    assert re.search(r"^tokenizing: [\d.,]+ kB in \d+s$", stderr, re.MULTILINE), stderr


def test_progress_in_a_log_file_is_a_line_every_30_seconds_and_one_at_the_end(monkeypatch, capsys):
    from tqdm import tqdm

    from finetune.core import console

    clock = iter(range(0, 1000, 10))  # each call is 10 s later: started at 0, then an update every 10 s
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    with console.bytes_progress(1_000_000, "tokenizing") as bar:  # capsys: stderr is not a terminal
        for _ in range(10):
            bar.update(100_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["tokenizing: 300.0 kB of 1.0 MB (30%), ETA 1m10s",
                     "tokenizing: 600.0 kB of 1.0 MB (60%), ETA 40s",
                     "tokenizing: 900.0 kB of 1.0 MB (90%), ETA 10s",
                     "tokenizing: 1.0 MB in 1m50s"]
    with pytest.raises(ValueError), console.bytes_progress(1000, "tokenizing") as bar:
        raise ValueError  # an error says what went wrong itself: no closing total after it
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with console.bytes_progress(1000, "tokenizing") as bar:
        assert isinstance(bar, tqdm)  # on a terminal the bar stays


def test_load_meta_catches_truncation_and_mismatch(prepared, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(prepared["out"], out)
    load_meta(out)
    train = out / "train.bin"
    original = train.read_bytes()
    train.write_bytes(original[:-2])  # one token short
    with pytest.raises(DataError, match="truncated"):
        load_meta(out)
    train.write_bytes(original)
    meta = json.loads((out / "meta.json").read_text())
    meta["splits"]["val"]["tokens"] += 1
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError):
        load_meta(out)
    meta["splits"]["val"]["tokens"] -= 1
    meta["dtype"] = "uint32"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError):
        load_meta(out)


@pytest.mark.slow
def test_val_input_and_determinism_and_overwrite(prepared, tiny_tokenizer_dir, tmp_path):
    root, docs = prepared["root"], prepared["docs"]
    args = ["--input", root / "books", "--tokenizer", tiny_tokenizer_dir, "--block-size", 64]
    # Same seed, different number of threads: identical files.
    same = tmp_path / "same"
    result = run_script("prepare_data.py", *args, "--output-dir", same, "--num-workers", 2)
    assert result.returncode == 0, result.stderr
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (same / name).read_bytes() == (prepared["out"] / name).read_bytes(), name
    # Another seed over the same folder (with --overwrite): another split, same tokens overall.
    result = run_script("prepare_data.py", *args, "--output-dir", same, "--seed", 7, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (same / "val.bin").read_bytes() != (prepared["out"] / "val.bin").read_bytes()
    assert load_meta(same)["split"]["seed"] == 7
    assert reassemble(same).tolist() == reassemble(prepared["out"]).tolist()
    assert sorted(p.name for p in same.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no temp files left
    # An explicit validation file.
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(make_corpus(8_000, seed=99), encoding="utf-8")
    explicit = tmp_path / "explicit"
    result = run_script("prepare_data.py", "--input", docs[0], "--val-input", held_out, "--tokenizer",
                        tiny_tokenizer_dir, "--output-dir", explicit, "--block-size", 64)
    assert result.returncode == 0, result.stderr
    meta = load_meta(explicit)
    tok = load(tiny_tokenizer_dir)
    assert meta["split"]["policy"] == "val-input"
    assert [s["role"] for s in meta["sources"]] == ["input", "val-input"]
    train, val = read_split(explicit, meta, "train"), read_split(explicit, meta, "val")
    assert train.tolist() == reference_ids(tok, text_of(docs[0])) + [tok.eos_token_id]
    assert val.tolist() == reference_ids(tok, text_of(held_out)) + [tok.eos_token_id]


# -----------------------------------------------------------------------------
# Safe cuts


@pytest.mark.slow
def test_safe_cuts_keep_gpt2_pre_tokens():
    """For every position the rule accepts, GPT-2's pre-tokenization gives the same pieces cut or
    whole (added tokens split off first, as Hugging Face does); and positions it rejects include
    ones where a cut would change them, which is why the rule is this narrow."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    special = "<|endoftext|>"

    def words(s):
        segments = s.split(special)
        out = [w for w, _ in pre.pre_tokenize_str(segments[0])]
        for segment in segments[1:]:
            out += [special] + [w for w, _ in pre.pre_tokenize_str(segment)]
        return out

    cutter = cuts.Cutter(added=[special])
    rejected_but_different, accepted_without_whitespace = 0, 0
    for seed in range(60):
        visible_only = seed >= 40  # the first 40: text with whitespace, as before the class-change rule
        text = adversarial_text(300, seed=seed, parts_from=NO_WHITESPACE if visible_only else ADVERSARIAL)
        whole = words(text)
        for p in range(1, len(text)):
            same = words(text[:p]) + words(text[p:]) == whole
            if cutter.is_safe(text, p):
                assert same, (text[max(0, p - 10):p], text[p:p + 10])
                accepted_without_whitespace += visible_only
            elif text[p - 1] == "\n" and not same:
                rejected_but_different += 1
    assert rejected_but_different > 0  # "cut after any newline" would be wrong
    assert accepted_without_whitespace > 20 * 30  # the class-change rule finds cuts in visible-only text
    assert words("x's") != words("x'") + words("s")  # why no cut after an apostrophe
    assert words("<|endoftext|>") != words("<|") + words("endoftext|>")  # why not across an added token
    assert words("a \nb") != words("a \n") + words("b")
    assert words("a  b") != words("a  ") + words("b")
    assert words("x\n\n" + special) != words("x\n") + words("\n" + special)  # why `avoid` exists


@pytest.mark.parametrize("engine_name", ["hf", "tiktoken"])
def test_chunked_equals_whole_on_adversarial_text_tiny(tmp_path, tiny_tokenizer_dir, engine_name):
    check_chunked_equals_whole(tmp_path, load(tiny_tokenizer_dir), engine_name)


@needs_gpt2
@pytest.mark.parametrize("engine_name", ["hf", "tiktoken"])
def test_chunked_equals_whole_on_adversarial_text_gpt2(tmp_path, engine_name):
    check_chunked_equals_whole(tmp_path, load(SHARED_GPT2_TOKENIZER), engine_name)


def check_chunked_equals_whole(tmp_path, tok, engine_name):
    pytest.importorskip("tiktoken")
    hf = engines.HFEngine(tok)
    engine = hf if engine_name == "hf" else engines.TiktokenEngine(engines.tokenizer_spec(tok), hf)
    for name, parts in (("adversarial", ADVERSARIAL), ("visible_only", NO_WHITESPACE)):
        text = adversarial_text(40_000, seed=3, parts_from=parts)
        path = tmp_path / f"{name}.txt"
        path.write_bytes(text.encode("utf-8"))  # no newline translation: \r\n stays
        expected = reference_ids(tok, text)
        for chunk_chars in (16, 1000):  # 16: a cut at nearly every candidate
            pieces, ids = chunked_ids(path, tok, engine, chunk_chars)
            assert "".join(p.text for p in pieces) == text
            assert len(pieces) > len(text) // (4 * chunk_chars), name
            assert ids.tolist() == expected, name


def test_ten_megabyte_line_without_newline(tmp_path, tiny_tokenizer_dir):
    """A 10 MB line (words and spaces, no newline) is cut at spaces; tokens equal the uncut encoding.

    The whole-text reference is tiktoken's own encoding of the uncut text (AutoTokenizer would
    take ~10 s here); tiktoken == AutoTokenizer is checked on the adversarial text above and
    on a 1 MB slice of this line below.
    """
    pytest.importorskip("tiktoken")
    tok = load(tiny_tokenizer_dir)
    engine = engines.TiktokenEngine(engines.tokenizer_spec(tok), engines.HFEngine(tok))
    base = make_corpus(1_000_000, seed=5).replace("\n", " ")
    line = base * 10
    path = tmp_path / "line.txt"
    path.write_text(line, encoding="utf-8")
    pieces, ids = chunked_ids(path, tok, engine, engines.CHUNK_CHARS)
    assert len(pieces) >= 10 and all(p.text[0] == " " for p in pieces[1:])
    assert np.array_equal(ids, engine.encode(line))
    assert engine.encode(base).tolist() == reference_ids(tok, base)


def test_text_without_whitespace_is_cut_where_the_class_changes(tmp_path, tiny_tokenizer_dir):
    """No whitespace at all: cut between letters, digits and punctuation, in pieces of the chunk size."""
    tok = load(tiny_tokenizer_dir)
    text = "abc.def,東京🙂" * 20_000
    path = tmp_path / "blob.txt"
    path.write_text(text, encoding="utf-8")
    pieces, ids = chunked_ids(path, tok, engines.HFEngine(tok), 1000)
    assert len(pieces) > len(text) // 1000 and max(len(p.text) for p in pieces) <= 1000
    assert ids.tolist() == reference_ids(tok, text)
    # One letter repeated is a single pre-token: no safe cut anywhere, so it stays whole.
    path.write_text("a" * 5000, encoding="utf-8")
    pieces, ids = chunked_ids(path, tok, engines.HFEngine(tok), 1000)
    assert len(pieces) == 1 and ids.tolist() == reference_ids(tok, "a" * 5000)


def test_other_tokenizers_get_verified_cuts(tmp_path, metaspace_tokenizer_dir):
    """Metaspace prepends "▁" to every piece, so a cut before a newline changes tokens:
    verification must reject those cuts and keep the ones that are safe."""
    tok = load(metaspace_tokenizer_dir)
    assert engines.byte_level_regex_reason(engines.tokenizer_spec(tok))  # no proof for this tokenizer
    hf = engines.HFEngine(tok)
    text = make_corpus(20_000, seed=4)
    path = tmp_path / "meta.txt"
    path.write_text(text, encoding="utf-8")
    pieces, ids = chunked_ids(path, tok, hf, 64)
    assert len(pieces) > 100
    assert ids.tolist() == reference_ids(tok, text)
    unverified, verified = cuts.Cutter(), cuts.Cutter(hf.encode)
    newline_cut = next(i for i in range(1, len(text) - 1) if text[i] == "\n" and unverified.is_safe(text, i))
    assert not verified.is_safe(text, newline_cut)  # "▁\nNext" would replace "\nNext"


def test_engines_are_chosen_by_tokenizer(tiny_tokenizer_dir, metaspace_tokenizer_dir):
    pytest.importorskip("tiktoken")
    engine, why = engines.choose_engine(*with_spec(tiny_tokenizer_dir), "auto", "")
    assert engine.name == "tiktoken", why
    engine, why = engines.choose_engine(*with_spec(metaspace_tokenizer_dir), "auto", "")
    assert engine.name == "hf" and "pre-tokenizer" in why
    with pytest.raises(UserError, match="--engine tiktoken"):
        engines.choose_engine(*with_spec(metaspace_tokenizer_dir), "tiktoken", "")


@needs_gpt2
def test_tiktoken_fast_path_matches_gpt2_autotokenizer():
    pytest.importorskip("tiktoken")
    tok = load(SHARED_GPT2_TOKENIZER)
    engine, why = engines.choose_engine(tok, engines.tokenizer_spec(tok), "auto", "")
    assert engine.name == "tiktoken" and engine.rank_to_id is None, why  # GPT-2: ranks are ids
    text = engines.probe_text(seed=1) + adversarial_text(50_000, seed=8) + make_corpus(50_000, seed=8)
    assert engine.encode(text).tolist() == reference_ids(tok, text)


# -----------------------------------------------------------------------------
# Reading, the split, dtypes


def test_reader_handles_characters_across_blocks_and_reports_byte_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "BLOCK_BYTES", 7)  # many multi-byte characters straddle a block edge
    text = adversarial_text(3_000, seed=1)
    good = tmp_path / "good.txt"
    good.write_bytes(text.encode("utf-8"))
    facts = {}
    assert "".join(t for t, _ in stream.read_text(good, "utf-8", facts, 0)) == text
    assert facts["bytes"] == good.stat().st_size
    raw = text.encode("utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(raw[:2000] + b"\xff" + raw[2000:])
    with pytest.raises(UserError, match=r"0xff at byte offset 2000"):
        for _ in stream.read_text(bad, "utf-8", {}, 0):
            pass


def test_val_ranges_are_seeded_stratified_and_inside():
    total = 1_000_000_000
    ranges = split.val_ranges(total, 0.1, seed=1)
    assert len(ranges) > 10
    assert ranges == split.val_ranges(total, 0.1, seed=1) != split.val_ranges(total, 0.1, seed=2)
    assert 0 < ranges[0][0] and ranges[-1][1] < total
    assert all(a < b <= c for (a, b), (c, _) in zip(ranges, ranges[1:]))
    assert abs(sum(b - a for a, b in ranges) / total - 0.1) < 1e-6
    assert len(split.val_ranges(40_000, 0.5, seed=1)) == 1


def test_chunker_moves_split_boundaries_to_safe_cuts(tmp_path):
    text = make_corpus(20_000, seed=2)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    cutter = cuts.Cutter()
    boundaries = [5_000, 9_000, 15_000, 15_010]
    pieces = list(stream.Chunker([path], [{}], "utf-8", cutter, boundaries=boundaries, chunk_chars=700))
    assert "".join(p.text for p in pieces) == text
    switches = [(p.start, p.split) for a, p in zip(pieces, pieces[1:]) if a.split != p.split]
    assert [split for _, split in switches] == ["val", "train", "val", "train"][:len(switches)]
    assert len(switches) >= 2 and 5_000 <= switches[0][0] < 5_100 and 9_000 <= switches[1][0] < 9_100
    chars = bytes_ = 0
    for p in pieces:  # every cut is a safe one, and byte offsets add up
        assert p.start == bytes_ and (chars == 0 or cutter.is_safe(text, chars))
        chars, bytes_ = chars + len(p.text), bytes_ + p.nbytes
    assert bytes_ == path.stat().st_size
    assert pieces[-1].doc_end and not any(p.doc_end for p in pieces[:-1])


@pytest.mark.slow
def test_uint32_path_and_narrowing(tmp_path, corpus_file):
    """> 65,536 entries: uint32 files. When no id >= 65,536 occurs the files are narrowed to uint16,
    since dataset.load_meta wants dtype == token_dtype(max_token_id)."""
    wide = build_wordlevel(tmp_path / "wide_tok", words_high=True)
    narrow = build_wordlevel(tmp_path / "narrow_tok", words_high=False)
    for tok_dir, dtype in ((wide, "uint32"), (narrow, "uint16")):
        out = tmp_path / f"data_{dtype}"
        args = ["--input", corpus_file, "--tokenizer", tok_dir, "--output-dir", out, "--block-size", 32]
        if dtype == "uint32":
            result = run_script("prepare_data.py", *args)
            assert result.returncode == 0, result.stderr
        else:
            prep.main(list(map(str, args)))  # in-process: same code, no second interpreter start
        meta = load_meta(out)  # dtype must equal token_dtype(max_token_id)
        tok = load(tok_dir)
        assert len(tok) > 2**16 and meta["dtype"] == dtype
        stream = reassemble(out)
        assert stream.tolist() == reference_ids(tok, text_of(corpus_file)) + [tok.eos_token_id]
        assert (meta["max_token_id"] >= 2**16) == (dtype == "uint32")


# -----------------------------------------------------------------------------
# Atomic outputs


def test_exception_after_writing_leaves_old_outputs(prepared, tmp_path, monkeypatch, tiny_tokenizer_dir, corpus_file):
    out = tmp_path / "data"
    shutil.copytree(prepared["out"], out)
    before = snapshot(out)

    def boom(*args):
        raise RuntimeError("simulated crash after the token files were written")

    monkeypatch.setattr(pipeline, "check_split_sizes", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prep.main(["--input", str(corpus_file), "--tokenizer", str(tiny_tokenizer_dir), "--output-dir", str(out),
                   "--overwrite", "--block-size", "32"])
    assert snapshot(out) == before


def test_fast_path_disagreement_restarts_with_hf(tmp_path, monkeypatch, tiny_tokenizer_dir, corpus_file, capsys):
    pytest.importorskip("tiktoken")

    def disagree(self, piece):
        raise engines.EngineMismatch("simulated disagreement", piece.source)

    monkeypatch.setattr(engines.TiktokenEngine, "encode_piece", disagree)
    out = tmp_path / "data"
    prep.main(["--input", str(corpus_file), "--tokenizer", str(tiny_tokenizer_dir), "--output-dir", str(out),
               "--block-size", "32"])
    assert "starting over with --engine hf" in capsys.readouterr().err
    tok = load(tiny_tokenizer_dir)
    assert reassemble(out).tolist() == reference_ids(tok, text_of(corpus_file)) + [tok.eos_token_id]


def test_sigterm_mid_run_leaves_old_outputs(prepared, tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "data"
    shutil.copytree(prepared["out"], out)
    before = snapshot(out)
    big = tmp_path / "big.txt"
    big.write_text(make_corpus(400_000, seed=3) * 20, encoding="utf-8")  # ~8 MB: the hf engine needs seconds
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "prepare_data.py"), "--input", str(big),
                                 "--tokenizer", str(tiny_tokenizer_dir), "--output-dir", str(out), "--overwrite",
                                 "--engine", "hf", "--num-workers", "1"], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 60
        while not list(out.glob(".train.bin.tmp-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "finished before it could be interrupted"
        time.sleep(0.3)  # let it write some tokens
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    assert "interrupted" in (tmp_path / "stderr.txt").read_text()
    assert snapshot(out) == before  # old outputs intact, temporary files gone


# -----------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\t\r\n   \u3000\n", encoding="utf-8")
    (tmp_path / "no_text").mkdir()
    (tmp_path / "no_text" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "no_text" / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("args, fragments", [
    (["--input", "missing.txt"], ["missing.txt", "does not exist"]),
    (["--input", "empty.txt"], ["empty.txt", "empty", "hint"]),
    (["--input", "blank.txt"], ["whitespace only", "hint"]),
    (["--input", "no_text"], ["no_text", "no text files", ".txt", "hidden"]),
    (["--input", "book.txt", "--val-fraction", "0"], ["--val-fraction", "between 0 and 1"]),
    (["--input", "book.txt", "--val-fraction", "1"], ["--val-fraction"]),
    (["--input", "book.txt", "--val-fraction", "-0.2"], ["--val-fraction"]),
    (["--input", "book.txt", "--val-fraction", "0.1", "--val-input", "book.txt"], ["exclude each other"]),
    (["--input", "book.txt", "--output-dir", "a_file"], ["a_file", "is a file"]),
    (["--input", "book.txt", "--encoding", "klingon"], ["--encoding", "klingon"]),
    (["--input", "book.txt", "--block-size", "1"], ["--block-size"]),
])
def test_bad_input_fails_cleanly(bad_inputs, corpus_file, args, fragments):
    assert corpus_file.parent == bad_inputs  # book.txt sits beside the bad inputs
    before = sorted(p.name for p in bad_inputs.iterdir())
    result = run_script("prepare_data.py", *args, "--tokenizer", "unused", cwd=bad_inputs)
    assert_one_line_error(result, *fragments)
    assert sorted(p.name for p in bad_inputs.iterdir()) == before  # nothing written (no data/ folder)


def test_existing_outputs_need_overwrite(prepared, tmp_path, tiny_tokenizer_dir, corpus_file):
    out = tmp_path / "data"
    shutil.copytree(prepared["out"], out)
    before = snapshot(out)
    result = run_script("prepare_data.py", "--input", corpus_file, "--tokenizer", tiny_tokenizer_dir,
                        "--output-dir", out)
    assert_one_line_error(result, "already holds", "--overwrite")
    assert snapshot(out) == before


@pytest.mark.slow
def test_undecodable_bytes_name_file_and_offset(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(("Plain text first. " * 100).encode() + "Caf\u00e9 au lait.".encode("latin-1"))
    out = tmp_path / "data"
    result = run_script("prepare_data.py", "--input", bad, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out)
    assert_one_line_error(result, "latin1.txt", "not valid utf-8", "offset 1803", "--encoding")
    assert not out.exists()


@pytest.mark.slow
def test_tokenizer_that_cannot_be_loaded(tmp_path, corpus_file):
    out = tmp_path / "data"
    result = run_script("prepare_data.py", "--input", corpus_file, "--tokenizer", tmp_path / "no_such_tokenizer",
                        "--output-dir", out)
    assert_one_line_error(result, "cannot load tokenizer", "no_such_tokenizer", "local tokenizer folder")
    started = time.time()
    result = run_script("prepare_data.py", "--input", corpus_file, "--tokenizer", "someone/not-a-real-model-xyz",
                        "--output-dir", out, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "cannot load tokenizer", "HF_HUB_OFFLINE")
    assert time.time() - started < 30  # offline: no retries
    assert not out.exists()


def test_split_too_small_says_how_to_fix(tmp_path, corpus_file, tiny_tokenizer_dir):
    out = tmp_path / "data"
    result = run_script("prepare_data.py", "--input", corpus_file, "--tokenizer", tiny_tokenizer_dir,
                        "--output-dir", out, "--val-fraction", "0.01")
    assert_one_line_error(result, "val split", "--block-size 1024", "raise --val-fraction", "add more text")
    assert not out.exists()


# -----------------------------------------------------------------------------
# Text without whitespace, end to end (#15.4); pieces of 16K characters so small files need many


def json_blob(n_chars: int) -> str:
    """A one-line JSON array without any whitespace, like a minified export."""
    words = make_corpus(n_chars, seed=21).split()
    records, size = [], 0
    for i in range(0, len(words), 7):
        record = {"id": i, "text": "_".join(words[i:i + 7]), "score": i / 7, "ok": i % 2 == 0}
        records.append(record)
        size += len(record["text"]) + 40
        if size > n_chars:
            break
    return json.dumps(records, ensure_ascii=False, separators=(",", ":"))


def test_one_line_json_blob_is_split_with_exact_tokens(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    monkeypatch.setattr(engines.TiktokenEngine, "piece_chars", 16 << 10)
    text = json_blob(300_000)
    assert not any(ch.isspace() for ch in text) and len(text) > 10 * (16 << 10)
    blob = tmp_path / "blob.txt"
    blob.write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    result = run_main(prep.main, ["--input", blob, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                       "--block-size", 64, "--val-fraction", 0.2], capsys)
    assert result.returncode == 0, result.stderr
    meta = load_meta(out)
    tok = load(tiny_tokenizer_dir)
    assert reassemble(out).tolist() == reference_ids(tok, text) + [tok.eos_token_id]
    val, train = meta["splits"]["val"]["tokens"], meta["splits"]["train"]["tokens"]
    assert 0.15 < val / (val + train) < 0.25
    (r,) = meta["split"]["val_ranges"]  # where it was asked for, give or take a few characters
    (a, b), = meta["split"]["requested_ranges"]
    assert 0 <= r["stream_bytes"][0] - a < 100 and 0 <= r["stream_bytes"][1] - b < 100


def test_text_that_cannot_be_cut_says_so_and_names_val_input(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    monkeypatch.setattr(engines.TiktokenEngine, "piece_chars", 16 << 10)
    letters = tmp_path / "letters.txt"
    letters.write_text("a" * 100_000, encoding="utf-8")
    out = tmp_path / "data"
    for fraction in ("0.1", "0.9"):  # raising --val-fraction cannot help, and the message does not say so
        result = run_main(prep.main, ["--input", letters, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                           "--block-size", 64, "--val-fraction", fraction], capsys)
        assert_one_line_error(result, "cannot be cut", "one letter repeated", "--val-input")
        assert "--val-fraction" not in result.stderr
        assert not out.exists()
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("b" * 20_000, encoding="utf-8")
    result = run_main(prep.main, ["--input", letters, "--val-input", held_out, "--tokenizer", tiny_tokenizer_dir,
                       "--output-dir", out, "--block-size", 64], capsys)
    assert result.returncode == 0, result.stderr
    tok = load(tiny_tokenizer_dir)
    meta = load_meta(out)
    assert read_split(out, meta, "val").tolist() == reference_ids(tok, "b" * 20_000) + [tok.eos_token_id]


# -----------------------------------------------------------------------------
# Start-up: a tokenizer recorded once is loaded without transformers


def test_recorded_tokenizer_skips_transformers_and_torch_with_identical_output(
        tmp_path, tiny_tokenizer_dir, corpus_file, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    args = ["--input", str(corpus_file), "--tokenizer", str(tiny_tokenizer_dir), "--block-size", "32"]
    prep.main([*args, "--output-dir", str(tmp_path / "first")])  # AutoTokenizer, checked, then recorded
    assert len(list((cache / "finetune" / "tokenizers").glob("*.json"))) == 1
    code = ("import sys, prepare_data; prepare_data.main(sys.argv[1:]); "
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, *args, "--output-dir", str(tmp_path / "second")],
                            cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"  # neither was imported
    assert snapshot(tmp_path / "second") == snapshot(tmp_path / "first")


def test_tokenizer_record_follows_the_files(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, folder)
    assert recorded.load_recorded_tokenizer(str(folder)) is None  # never recorded
    tok = load(folder)
    assert recorded.remember_tokenizer(str(folder), tok, engines.probe_text())
    fast = recorded.load_recorded_tokenizer(str(folder))
    text = adversarial_text(5_000, seed=2)
    assert fast(text)["input_ids"] == reference_ids(tok, text)
    assert (len(fast), fast.eos_token_id, fast.get_vocab()) == (len(tok), tok.eos_token_id, tok.get_vocab())
    with open(folder / "tokenizer_config.json", "a", encoding="utf-8") as f:
        f.write(" ")  # any change to a file the tokenizer is built from: a new check
    assert recorded.load_recorded_tokenizer(str(folder)) is None


@needs_gpt2
def test_tokenizer_whose_config_changes_its_pipeline_is_not_recorded(tmp_path, corpus_file, monkeypatch):
    """GPT-2 with add_prefix_space in tokenizer_config.json: AutoTokenizer adds the space, tokenizer.json
    alone does not; the record would change the ids, so it is refused and every run loads AutoTokenizer."""

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "gpt2_prefix_space"
    shutil.copytree(SHARED_GPT2_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_prefix_space": True}))
    tok = load(folder)
    assert not recorded.remember_tokenizer(str(folder), tok, engines.probe_text())
    out = tmp_path / "data"
    prep.main(["--input", str(corpus_file), "--tokenizer", str(folder), "--output-dir", str(out), "--block-size", "32"])
    assert not (tmp_path / "cache").exists()
    assert reassemble(out).tolist() == reference_ids(tok, text_of(corpus_file)) + [tok.eos_token_id]
