"""--fsdp on CPU (gloo): 2 sharded processes train like 1 process with the same global batch; sharded
checkpoints resume at another number of processes, and a kill -9 during a sharded save leaves only checkpoints
that load; releases are plain Hugging Face folders.

The model has an odd vocabulary (401 rows), so the embedding's shards are uneven (201 + 200 rows).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import finetune_generative as ft
import generate
from finetune.core.fsio import TMP_PREFIX
from finetune.formats import checkpoints as ckpt
from helpers import REPO_ROOT, assert_trained_alike, base_args, build_tiny_model, newest_step, train_records

VOCAB = 401
STEPS = 16


@pytest.fixture(scope="module")
def odd_model_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("odd_model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    build_tiny_model(out, vocab_size=VOCAB)
    return out


def args(model_dir, data_dir, out, batch: int, *extra) -> list[str]:
    # Dropout off: processes draw dropout masks from different RNG streams.
    return base_args(model_dir, data_dir, out, "--dropout", "0", "--max-steps", STEPS, "--batch-size", batch,
                     "--eval-every", "8", "--eval-batches", "2", "--save-every", "0", *extra)


def torchrun_cmd(nproc: int, *script_args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            str(REPO_ROOT / "finetune_generative.py"), *map(str, script_args)]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, odd_model_dir, tiny_data_dir):
    """The reference: one plain process, batch 8 x accum 2 (the 2-process runs: 4 x 2 x 2)."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert ft.main(args(odd_model_dir, tiny_data_dir, out, 8)) == 0
    return out


@pytest.mark.slow
def test_two_sharded_processes_stopped_by_sigterm_resume_in_one(one_process_run, tmp_path, odd_model_dir,
                                                                tiny_data_dir, capsys):
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        torchrun_cmd(2, *args(odd_model_dir, tiny_data_dir, out, 4, "--fsdp", "--sample-prompt", "the",
                              "--sample-max-new-tokens", "4")),
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"), env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(train_records(out)) < 2):
        time.sleep(0.05)
    rank1 = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    rank1[0].send_signal(15)  # SIGTERM: rank 1 votes to stop, both save their shards and exit
    launcher.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    stopped_at = train_records(out)[-1]["step"]
    assert launcher.returncode != 0 and 2 <= stopped_at < STEPS, err[-3000:]
    stop_checkpoint = out / f"checkpoint-{stopped_at}"
    assert sorted(p.name for p in (stop_checkpoint / "sharded").iterdir()) == [".metadata", "__0_0.distcp",
                                                                               "__1_0.distcp"]
    assert not (stop_checkpoint / "model.safetensors").exists()  # each rank wrote its part; none gathered
    state = ckpt.load_training_state(stop_checkpoint)
    assert state["sharded"] and state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["optimizer"] is None and set(state["file_crc32"]) == {
        "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"}
    # Sampling ran on both ranks (each forward pass gathers from both); rank 0 alone wrote the samples.
    evals = [r["step"] for r in train_records(out, "eval")]
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(evals)
    # Sharded, 2 processes == 1 process up to the stop: same steps, tokens and losses.
    reference = train_records(one_process_run)
    for a, b in zip(train_records(out), reference):
        assert (a["step"], a["tokens"]) == (b["step"], b["tokens"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-4)

    # Resumed by one process (no torchrun): resharded, the global batch kept (4 x 4 accum), the same end.
    with pytest.raises(SystemExit):  # the resume picks the per-process batch itself
        ft.main(["--output-dir", str(out), "--resume", "--batch-size", "4"])
    assert "--batch-size and --grad-accum are chosen by a resume at another number" in capsys.readouterr().err
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    assert [r["step"] for r in train_records(out)] == list(range(1, STEPS + 1))
    for a, b in zip(train_records(out), reference):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    final, expected = load_file(out / "model.safetensors"), load_file(one_process_run / "model.safetensors")
    assert_trained_alike(final, expected, [r["lr"] for r in reference])
    assert "lm_head.weight" not in final  # the tie is saved once, as by save_pretrained
    initial = load_file(odd_model_dir / "model.safetensors")["transformer.wte.weight"]
    assert final["transformer.wte.weight"].shape[0] == VOCAB
    assert (final["transformer.wte.weight"] != initial).any(dim=1).all()  # every row trained, 401st included


@pytest.fixture(scope="module")
def sharded_single_run(tmp_path_factory, odd_model_dir, tiny_data_dir):
    """One sharded process (a process group of one, no torchrun): the start of the 1 -> 2 resume."""
    out = tmp_path_factory.mktemp("sharded1") / "out"
    assert ft.main(args(odd_model_dir, tiny_data_dir, out, 8, "--fsdp", "--max-steps", "4", "--save-every", "2",
                                "--eval-every", "4", "--eval-batches", "0")) == 0
    return out


@pytest.mark.slow
def test_one_sharded_process_resumed_by_two_and_the_release_gives_the_sharded_loss(sharded_single_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.data.dataset import TextDataset, validation_blocks
    from finetune.train.loss import next_token_loss

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(sharded_single_run / "checkpoint-2", out / "checkpoint-2")
    result = subprocess.run(torchrun_cmd(2, "--output-dir", out, "--resume"), capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--batch-size 8 x --grad-accum 1 per process" in result.stderr
    assert [r["step"] for r in train_records(out)] == [3, 4]
    assert [r["loss"] for r in train_records(out)] == pytest.approx(
        [r["loss"] for r in train_records(sharded_single_run) if r["step"] > 2], abs=1e-5)
    assert_trained_alike(load_file(out / "model.safetensors"), load_file(sharded_single_run / "model.safetensors"),
                         [r["lr"] for r in train_records(sharded_single_run)])
    # The released folder loads with from_pretrained and gives the loss the sharded model measured at the end
    # (every validation block, the ranks' shares together, as one process measures it).
    state = ckpt.load_training_state(out / "checkpoint-4")
    data_dir, block = state["config"]["data_dir"], state["config"]["block_size"]
    val = TextDataset.from_data_dir(data_dir, "val", block)
    blocks = sorted(i for rank in (0, 1) for i in validation_blocks(len(val), len(val), rank, 2))
    assert blocks == list(range(len(val))) and len(val) % 2 == 1  # uneven shares: rank 1 has one block less
    final_eval = train_records(out, "eval")[-1]
    for folder in (out, out / "best"):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        ids = torch.stack([val[i]["input_ids"] for i in blocks])
        with torch.no_grad():
            loss = next_token_loss(model(input_ids=ids).logits, ids).item()
        assert loss == pytest.approx(final_eval["val_loss"], abs=1e-5)
        assert model.config.architectures == ["GPT2LMHeadModel"]


def test_a_missing_or_short_shard_is_damaged(sharded_single_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(sharded_single_run, out)
    (out / "checkpoint-4" / "sharded" / "__0_0.distcp").unlink()
    with pytest.raises(SystemExit) as exc:
        ft.main(["--output-dir", str(out), "--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "checkpoint-4 is damaged: sharded/__0_0.distcp missing" in err
    assert "--skip-damaged-checkpoints" in err and "checkpoint-2" in err
    with pytest.raises(SystemExit) as exc:  # generate.py cannot load shards, and says what to pass instead
        generate.main(["--model", str(out / "checkpoint-2"), "--prompt", "the"])
    assert exc.value.code == 2 and "checkpoint of an --fsdp run" in capsys.readouterr().err
    shard = out / "checkpoint-2" / "sharded" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ckpt.DamagedCheckpoint, match="cut short"):
        ckpt.read_checkpoint(out / "checkpoint-2")


def published_name(temporary) -> str:
    """checkpoint-N of its temporary folder .tmp-checkpoint-N-PID."""
    return temporary.name[len(TMP_PREFIX):].rsplit("-", 1)[0]


def stop_in_a_sharded_save(launcher: subprocess.Popen, out, after: int, timeout: float = 120):
    """SIGSTOP every process of the run as soon as a shard file appears in the temporary folder of a checkpoint
    later than checkpoint-{after}; returns that folder. A stop that comes too late (the training state already
    written, or the folder published) lets the run go on to its next save."""
    deadline = time.time() + timeout
    while launcher.poll() is None:
        assert time.time() < deadline, f"no sharded save caught in {timeout}s"
        if newest_step(out) >= after:
            for shard in out.glob(f"{TMP_PREFIX}checkpoint-*/sharded/*.distcp"):
                processes = [launcher, *psutil.Process(launcher.pid).children(recursive=True)]
                for process in processes:
                    process.send_signal(signal.SIGSTOP)
                folder = shard.parent.parent
                if (folder.is_dir() and not (folder / "training_state.pt").exists()
                        and not (out / published_name(folder)).exists()):
                    return folder
                for process in processes:
                    process.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("the run ended before a sharded save was caught")


@pytest.mark.slow
def test_kill9_during_a_sharded_save_leaves_only_checkpoints_that_load(one_process_run, tmp_path, odd_model_dir,
                                                                       tiny_data_dir, capsys):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    launcher = subprocess.Popen(
        torchrun_cmd(2, *args(odd_model_dir, tiny_data_dir, out, 4, "--fsdp", "--save-every", "1",
                              "--save-total-limit", "3")),
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        partial = stop_in_a_sharded_save(launcher, out, after=2)
        caught = sorted(p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file())
    except BaseException:
        print(log.read_text()[-3000:])
        raise
    finally:  # kill -9 of every process of the run (torchrun starts each worker in a session of its own)
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in [*psutil.Process(launcher.pid).children(recursive=True), launcher]:
                process.send_signal(signal.SIGKILL)
    launcher.wait(timeout=60)
    killed_at = ckpt.checkpoint_step(out / published_name(partial))
    print(f"killed in the save of checkpoint-{killed_at}; its temporary folder held {caught}")

    # Every checkpoint left is complete: its files and checksums, and every tensor of its shards reads.
    left = ckpt.list_checkpoints(out)
    assert [ckpt.checkpoint_step(p) for p in left] == list(range(max(1, killed_at - 3), killed_at)), caught
    for checkpoint in left:
        state = ckpt.read_checkpoint(checkpoint)
        assert state["sharded"] and state["step"] == ckpt.checkpoint_step(checkpoint)
        dcp_to_torch_save(checkpoint / "sharded", tmp_path / "full.pt")
        full = torch.load(tmp_path / "full.pt", weights_only=True)
        assert full["model"]["transformer.wte.weight"].shape == (VOCAB, 32) and full["optimizer"]["state"]
    # The half-written one, had it been published, would be refused as damaged, not resumed from.
    with pytest.raises(ckpt.DamagedCheckpoint, match="missing"):
        ckpt.read_checkpoint(partial)

    # --resume continues from the newest complete checkpoint and ends as the uninterrupted run: here in one
    # process (resharded, and no second torchrun start to wait for), saving at the end only.
    assert ft.main(["--output-dir", str(out), "--resume", "--save-every", "0"]) == 0
    assert f"resuming from {left[-1]}" in capsys.readouterr().err
    assert not list(out.glob(f"{TMP_PREFIX}*"))  # the killed save's leftovers are deleted at the start
    reference = train_records(one_process_run)
    assert [r["step"] for r in train_records(out)] == list(range(1, STEPS + 1))
    for a, b in zip(train_records(out), reference):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    assert_trained_alike(load_file(out / "model.safetensors"), load_file(one_process_run / "model.safetensors"),
                         [r["lr"] for r in reference])


def test_refusals(one_process_run, odd_model_dir, tiny_data_dir, tmp_path, capsys):
    from transformers import OpenAIGPTConfig

    def refused(argv, *fragments):
        with pytest.raises(SystemExit) as exc:
            ft.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err, err
        line = [t for t in err.splitlines() if t.startswith("error:")]
        assert len(line) == 1 and all(f in line[0] for f in fragments), err

    out = tmp_path / "out"
    refused(args(odd_model_dir, tiny_data_dir, out, 8, "--fsdp", "--compile"), "--fsdp with --compile")
    refused(args(odd_model_dir, tiny_data_dir, out, 8, "--fsdp", "--lora-r", "4"), "--fsdp with --lora-r")
    no_blocks = tmp_path / "openai-gpt"  # its transformers class names no block class (_no_split_modules)
    OpenAIGPTConfig(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(no_blocks)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(odd_model_dir / name, no_blocks / name)
    refused(args(no_blocks, tiny_data_dir, out, 8, "--fsdp"), "no transformer blocks", "OpenAIGPTLMHeadModel",
            "_no_split_modules")
    refused(["--output-dir", one_process_run, "--resume", "--fsdp"], "written without --fsdp")
    assert not out.exists()


def test_dry_run_plans_ddp_and_fsdp_side_by_side(odd_model_dir, tiny_data_dir, tmp_path, capsys):
    from transformers import GPT2Config

    wider = tmp_path / "wider"  # a config alone: --dry-run reads no weights
    GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=256, n_layer=8, n_head=4).save_pretrained(wider)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(odd_model_dir / name, wider / name)
    out = tmp_path / "out"
    assert ft.main(args(wider, tiny_data_dir, out, 8, "--fsdp", "--dry-run", "--nproc", "4")) == 0
    text = capsys.readouterr().out
    assert "8 x 2 accum x 4 process(es)" in text
    line = next(t for t in text.splitlines() if t.startswith("sharding"))
    ddp, fsdp_gib = (float(part.split("~")[1].split()[0]) for part in line.split(",")[:2])
    assert "at 4 process(es)" in line and "(this run: FSDP)" in line and "fit this machine's" in line
    assert fsdp_gib < ddp and f"memory estimate  ~{fsdp_gib:.2f} GiB per process" in text
    assert not out.exists()


@pytest.mark.slow
def test_fewer_validation_blocks_than_sharded_processes(odd_model_dir, tiny_data_dir, tmp_path):
    """One validation block, two sharded processes: rank 1 has none to evaluate, yet the loss is that block's
    (it was NaN: issue 27, 4), before and after training."""
    from transformers import AutoModelForCausalLM

    from finetune.data.dataset import TextDataset
    from finetune.train.loss import next_token_loss

    out = tmp_path / "out"
    result = subprocess.run(torchrun_cmd(2, *args(odd_model_dir, tiny_data_dir, out, 1, "--fsdp", "--max-steps", "1",
                                                  "--eval-batches", "1", "--eval-every", "1")),
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluation       1 of" in result.stdout + result.stderr
    evals = train_records(out, "eval")
    assert [r["step"] for r in evals] == [0, 1]
    val = TextDataset.from_data_dir(tiny_data_dir, "val", ckpt.load_training_state(
        out / "checkpoint-1")["config"]["block_size"])
    ids = val[0]["input_ids"][None]
    for folder, record in ((odd_model_dir, evals[0]), (out, evals[1])):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            expected = next_token_loss(model(input_ids=ids).logits, ids).item()
        assert record["val_loss"] == pytest.approx(expected, abs=1e-5), (folder, record)
