"""LoRA (--lora-r): adapters on a frozen tiny GPT-2, on CPU, fp32.

The guarantees of full fine-tuning, for LoRA runs: resumed == uninterrupted bitwise (epoch boundary,
--grad-accum 2, a real SIGTERM, kill -9), torchrun 2 processes == 1; and LoRA's own: checkpoints hold
the adapter only, releases are merged models equal to base + adapter, other causal LMs train, bad
input is one error line.
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_generative as ft
from finetune.formats import checkpoints as ckpt
from finetune.models import adapters
from finetune.train import lora
from finetune.train.build import build_model
from finetune.train.config import TrainConfig
from helpers import (
    assert_clean_error,
    assert_same_weights,
    assert_trained_alike,
    base_args,
    build_tiny_model,
    common_args,
    error_lines,
    newest_step,
    run_main,
    start,
    torchrun,
    train_records,
    wait_for_step,
)

LORA = ["--lora-r", "4", "--lora-dropout", "0.1"]  # adapter dropout on: the RNG must resume too
RUN = ["--batch-size", "16", "--max-steps", "13", *LORA]  # 11 steps per epoch: 13 crosses the epoch boundary
CHECKPOINT_FILES = ["adapter_base.json", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "training_state.pt"]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    out = tmp_path_factory.mktemp("lora") / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, *RUN, "--save-every", "5")) == 0
    return out


def test_checkpoints_hold_the_adapter_and_releases_the_merged_model(lora_run, tiny_model_dir):
    checkpoint = lora_run / "checkpoint-13"
    assert sorted(p.name for p in checkpoint.iterdir()) == CHECKPOINT_FILES
    weights = adapter(checkpoint)
    # 2 layers x 4 adapted layers x (A, B); nothing of the frozen base.
    assert len(weights) == 16 and all(".lora_A." in k or ".lora_B." in k for k in weights)
    state = ckpt.read_checkpoint(checkpoint)
    assert state["step"] == 13 and state["config"]["lora_r"] == 4
    assert state["base_fingerprint"] == adapters.base_fingerprint(str(tiny_model_dir))
    assert sum(p.numel() for s in state["optimizer"]["state"].values() for p in [s["exp_avg"]]) == \
        sum(w.numel() for w in weights.values())  # AdamW over the adapters only
    for release in (lora_run, lora_run / "best"):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in release.iterdir()}
        assert not (release / "adapter_config.json").exists()  # a plain model: transformers loads it without peft
        config = json.loads((release / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tiny_model_dir) and Path(str(tiny_model_dir)).is_absolute()
    assert_same_adapter(lora_run / "adapter", checkpoint)
    assert not list(lora_run.glob(".tmp-*"))


def test_merged_model_equals_base_plus_adapter_and_keeps_the_embedding(lora_run, tiny_model_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.arange(40).reshape(2, 20) % 300
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    unmerged = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits
    monkeypatch.setitem(sys.modules, "peft", None)  # the release loads on a machine without peft
    from transformers import pipeline

    merged = AutoModelForCausalLM.from_pretrained(lora_run).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    base_weights, merged_weights = load_file(tiny_model_dir / "model.safetensors"), load_file(lora_run / "model.safetensors")
    assert torch.equal(merged_weights["transformer.wte.weight"], base_weights["transformer.wte.weight"])
    assert not torch.equal(merged_weights["transformer.h.0.attn.c_attn.weight"],
                           base_weights["transformer.h.0.attn.c_attn.weight"])  # the adapter was merged in
    generated = pipeline("text-generation", model=str(lora_run), device="cpu")("The ship", max_new_tokens=3,
                                                                               do_sample=False)
    assert generated[0]["generated_text"].startswith("The ship")


def test_a_base_saved_in_bf16_merges_into_float32_with_the_delta_unrounded(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                           capsys):
    """A bf16 base: the merged model is written in float32 (the base's values exactly, plus the adapter's
    delta as peft computes it), not rounded back to bf16, which would lose part of the delta; said once."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16-base"
    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    build_tiny_model(tmp_path / "fp32", vocab_size=vocab).to(torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, base / name)
    out = tmp_path / "out"
    result = run_main(ft.main, base_args(base, tiny_data_dir, out, "--max-steps", "4", *LORA), capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    said = [t for t in result.stderr.splitlines() if "stores its weights in bfloat16" in t]
    assert len(said) == 1 and "the merged models (best/, the final model) are written in float32" in said[0], said
    stored, merged = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16} and merged.keys() == stored.keys()
    assert {t.dtype for t in merged.values()} == {torch.float32}
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          out / "adapter").merge_and_unload().state_dict()
    for key, tensor in merged.items():  # bitwise what peft's merge gives on the base read in fp32
        assert torch.equal(tensor, reference[key]), key
    assert torch.equal(merged["transformer.wte.weight"], stored["transformer.wte.weight"].float())
    adapted = merged["transformer.h.0.attn.c_attn.weight"]
    assert not torch.equal(adapted.to(torch.bfloat16).float(), adapted)  # in bf16 the merge would be rounded
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


def test_resume_equals_uninterrupted_across_epoch_boundary(lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(lora_run / "checkpoint-5", out / "checkpoint-5")
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    original = [r for r in train_records(lora_run) if r["step"] > 5]
    resumed = train_records(out)
    assert [r["step"] for r in resumed] == list(range(6, 14)) and resumed[-1]["epoch"] == 1
    assert [(r["loss"], r["lr"], r["tokens"]) for r in resumed] == [(r["loss"], r["lr"], r["tokens"]) for r in original]
    assert_same_adapter(lora_run / "checkpoint-13", out / "checkpoint-13")
    assert_same_weights(lora_run, out)  # the merged final models


@pytest.mark.slow
def test_sigterm_saves_an_adapter_checkpoint_that_resumes_exactly(lora_run, tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    proc = start(base_args(tiny_model_dir, tiny_data_dir, out, *RUN, "--save-every", "0"), tmp_path / "stderr.txt")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 6):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, (tmp_path / "stderr.txt").read_text()
    (checkpoint,) = out.glob("checkpoint-*")
    assert 0 < ckpt.checkpoint_step(checkpoint) < 13, "SIGTERM arrived after the run finished"
    assert sorted(p.name for p in checkpoint.iterdir()) == CHECKPOINT_FILES
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    assert [r["loss"] for r in train_records(out)] == [r["loss"] for r in train_records(lora_run)]
    assert_same_weights(lora_run, out)


@pytest.mark.slow
def test_kill9_at_random_moments_leaves_loadable_adapter_checkpoints(tmp_path, tiny_model_dir, tiny_data_dir):
    run = ["--batch-size", "8", "--grad-accum", "1", "--max-steps", "20", "--lr", "1e-3", "--save-total-limit", "3",
           *LORA]
    reference = tmp_path / "reference"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, reference, *run)) == 0
    out = tmp_path / "out"
    for kill, extra_steps in enumerate((2, 3, 2)):
        before = newest_step(out)
        args = (["--output-dir", out, "--resume"] if before else
                base_args(tiny_model_dir, tiny_data_dir, out, *run, "--save-every", "1"))
        proc = start(args, tmp_path / f"stderr-{kill}.txt")
        try:
            assert wait_for_step(proc, out, before + extra_steps), (tmp_path / f"stderr-{kill}.txt").read_text()
            time.sleep(0.03 * kill)
        finally:
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        for checkpoint in ckpt.list_checkpoints(out):  # every checkpoint left loads
            assert sorted(p.name for p in checkpoint.iterdir()) == CHECKPOINT_FILES
            assert ckpt.read_checkpoint(checkpoint)["step"] == ckpt.checkpoint_step(checkpoint)
    assert 0 < newest_step(out) < 20
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    assert not list(out.glob(".tmp-*"))
    assert [r["loss"] for r in train_records(out)] == [r["loss"] for r in train_records(reference)]
    assert_same_weights(reference, out)
    assert_same_adapter(reference / "adapter", out / "adapter")


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tiny_model_dir, tiny_data_dir):
    args = ["--max-steps", "6", "--lora-r", "4", "--lora-dropout", "0"]
    ddp = tmp_path / "ddp"
    result = torchrun(2, *common_args(tiny_model_dir, tiny_data_dir, ddp, 4, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    single = tmp_path / "single"
    assert ft.main(common_args(tiny_model_dir, tiny_data_dir, single, 8, *args)) == 0
    a, b = train_records(ddp), train_records(single)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    assert_trained_alike(adapter(ddp / "adapter"), adapter(single / "adapter"), [r["lr"] for r in b])


def test_frozen_linears_in_bf16_compute_what_autocast_computes():
    """The decision to hold the frozen block linears in bf16 under bf16 autocast: autocast casts them
    to bf16 for each matmul anyway, so loss and adapter gradients are bitwise those of fp32 storage."""
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    ids = torch.randint(0, 300, (2, 16))
    cfg = TrainConfig(lora_r=4, lora_dropout=0.0)
    results = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        model = get_peft_model(GPT2LMHeadModel(config), lora.lora_config(cfg, ["c_attn", "c_proj", "c_fc"], True))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0; a non-zero B makes the adapters' gradients all count
                torch.nn.init.normal_(p, std=0.02)
        if dtype is not None:
            lora.hold_frozen_linears_in(model, dtype)
            assert model.get_submodule("base_model.model.transformer.h.0.mlp.c_fc.base_layer").weight.dtype == dtype
            assert model.get_submodule("base_model.model.transformer.wte").weight.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), [p.grad for p in model.parameters() if p.requires_grad]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("torch_dropout", [False, True])
def test_adapter_dropout_uses_the_fast_cpu_masks_unless_torch_dropout(torch_dropout, tiny_model_dir):
    """peft puts a new nn.Dropout before each adapter: the training script gives the model the fast CPU masks
    after the LoRA conversion, so those get them too (same keep-probability), and --torch-dropout keeps torch's."""
    from transformers import AutoTokenizer

    from finetune.models.cpu_dropout import ATTENTION_NAME, CPUDropout

    cfg = TrainConfig(model=str(tiny_model_dir), lora_r=4, lora_dropout=0.1, torch_dropout=torch_dropout)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    peft_model, _ = build_model(cfg, tokenizer, str(tiny_model_dir), torch.device("cpu"), "fp32")
    adapter_dropouts = [m for name, m in peft_model.named_modules() if name.endswith("lora_dropout.default")]
    assert len(adapter_dropouts) == 2 * 4 and all(m.p == 0.1 for m in adapter_dropouts)  # 2 layers x 4 linears
    dropouts = [m for m in peft_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert {type(m) for m in dropouts} == {torch.nn.Dropout if torch_dropout else CPUDropout}
    assert (peft_model.config._attn_implementation == ATTENTION_NAME) != torch_dropout  # through peft's wrapper


# -----------------------------------------------------------------------------
# Other causal LMs


def build_other_model(kind: str, out: Path, tokenizer_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    if kind != "gpt_neox":
        sizes["num_key_value_heads"] = 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **sizes)).save_pretrained(out)


TARGETS = {"llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
           "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
           "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]}


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_other_causal_lms_train_with_lora(kind, tmp_path, tiny_tokenizer_dir, tiny_data_dir):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / kind
    build_other_model(kind, model_dir, tiny_tokenizer_dir)
    out = tmp_path / "out"
    assert ft.main(base_args(model_dir, tiny_data_dir, out, "--max-steps", "3", "--lora-r", "4")) == 0
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    state = ckpt.read_checkpoint(out / "checkpoint-3")
    assert state["config"]["lora_r"] == 4
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter(out / "checkpoint-3")}
    assert sorted(adapted) == TARGETS[kind]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.model_type == kind and not list(out.glob("adapter_config.json"))


# -----------------------------------------------------------------------------
# The plan and bad input


def test_dry_run_shows_trainable_parameters_and_lora_memory(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    out = tmp_path / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--lora-r", "4", "--dry-run")) == 0
    text = capsys.readouterr().out
    # Per layer, r x (in + out) for c_attn (32 -> 96), attn.c_proj (32 -> 32), c_fc (32 -> 128), mlp.c_proj (128 -> 32).
    trainable = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert f"LoRA             r 4, alpha 8, on c_attn, c_fc, c_proj: {trainable:,} trainable of" in text
    assert "GiB" in text and not out.exists()


BAD_LORA = [
    (["--lora-alpha", "16"], "--lora-alpha given, but LoRA is off (--lora-r 0)"),
    (["--lora-dropout", "0.1", "--lora-target-modules", "c_attn"], "--lora-dropout, --lora-target-modules given"),
    (["--lora-r", "-1"], "--lora-r must be >= 0"),
    (["--lora-r", "4", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--lora-r", "4", "--lora-target-modules", "q_proj", "c_attn"],
     "--lora-target-modules q_proj: no such linear layer in the blocks of this gpt2 model; the ones there are "
     "c_attn, c_fc, c_proj"),
    (["--lora-r", "4", "--lora-target-modules", "wte"], "the ones there are c_attn, c_fc, c_proj"),
    (["--lora-r", "4", "--lora-target-modules", ""], "--lora-target-modules: an empty layer name; the linear layers "
     "in the blocks of this gpt2 model are c_attn, c_fc, c_proj (HINT: name some of those"),
    (["--lora-r", "4", "--lora-target-modules", "c_attn,"], "--lora-target-modules: an empty layer name"),
]


@pytest.mark.parametrize("extra, message", BAD_LORA, ids=[" ".join(a) for a, _ in BAD_LORA])
def test_bad_lora_arguments(tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch, extra, message):
    loaded = []
    monkeypatch.setattr("finetune.models.loading.load_weights", lambda *a, **k: loaded.append(a))
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, tmp_path / "out", *extra), capsys)
    assert_clean_error(result, message)
    assert len(error_lines(result.stderr)) == 1 and not loaded and not (tmp_path / "out").exists()


def test_a_rank_training_most_of_the_model_warns_and_gpt2_needs_no_fan_in_fan_out_warning(
        tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    """r 64 on the tiny model's 32-wide layers: the adapters outgrow the base, which is one logged line.
    peft's fan_in_fan_out warning for GPT-2's Conv1D is not raised: the converter sets what peft would."""
    import warnings

    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "1", "--lora-r", "64")) == 0
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    lines = [line for line in capsys.readouterr().err.splitlines() if "LoRA adapters train" in line]
    trainable = 2 * 64 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert len(lines) == 1 and f"train {trainable:,} parameters" in lines[0] and "HINT: a rank like" in lines[0]
    small = lora.size_warning({"trainable": 10, "total": 30, "r": 1})  # 10 of a base of 20: at the threshold
    assert small is None and lora.size_warning({"trainable": 11, "total": 31, "r": 1}) is not None


def test_a_model_peft_cannot_wrap_is_one_line_before_weights_load(tmp_path, tiny_model_dir, tiny_data_dir, capsys,
                                                                  monkeypatch):
    """No local model was found that peft refuses, so its refusal is injected: peft's own exception, raised
    when the weightless copy is wrapped, must become one error line before any weights load."""
    import peft

    def refuse(model, config, *args, **kwargs):
        raise ValueError("Target module Conv1D() is not supported.\nCurrently, only these are supported: ...")

    loaded = []
    monkeypatch.setattr(peft, "get_peft_model", refuse)
    monkeypatch.setattr("finetune.models.loading.load_weights", lambda *a, **k: loaded.append(a))
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, tmp_path / "out", "--lora-r", "4"), capsys)
    assert_clean_error(result, "peft cannot wrap this gpt2 model (ValueError: Target module Conv1D() is not "
                       "supported", "HINT: train it without --lora-r")
    assert len(error_lines(result.stderr)) == 1 and not loaded and not (tmp_path / "out").exists()


def test_lora_without_peft_is_one_line_with_the_pip_command(tmp_path, tiny_model_dir, tiny_data_dir, capsys,
                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, tmp_path / "out", "--lora-r", "4"), capsys)
    assert_clean_error(result, "LoRA needs the peft package, which is not installed", "pip install peft")


def test_resume_refused_with_other_lora_settings_or_another_base(lora_run, tmp_path, tiny_model_dir, tiny_data_dir,
                                                                 tiny_tokenizer_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(lora_run / "checkpoint-5", out / "checkpoint-5")
    result = run_main(ft.main, ["--output-dir", out, "--resume", "--lora-r", "8"], capsys)
    assert_clean_error(result, "--lora-r 8 differs from the checkpoint's 4")
    # The same base folder, other weights in it: the fingerprint tells.
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    run = tmp_path / "run"
    assert ft.main(base_args(base, tiny_data_dir, run, "--max-steps", "2", "--lora-r", "4")) == 0
    build_tiny_model(base, vocab_size=json.loads((base / "config.json").read_text())["vocab_size"], seed=1)
    result = run_main(ft.main, ["--output-dir", run, "--resume"], capsys)
    assert_clean_error(result, f"the base model {base} differs from the one the checkpoint's adapter was trained on")


def test_generate_loads_adapters_and_says_when_the_base_is_missing(lora_run, tmp_path, capsys):
    import generate

    outputs = {}
    for folder in (lora_run, lora_run / "adapter", lora_run / "checkpoint-13"):
        assert generate.main(["--model", str(folder), "--prompt", "The ship", "--greedy", "--max-new-tokens", "6",
                              "--device", "cpu", "--precision", "fp32"]) == 0
        outputs[folder.name] = capsys.readouterr().out
    assert outputs[lora_run.name] == outputs["adapter"] == outputs["checkpoint-13"]  # merged == base + adapter
    moved = tmp_path / "adapter"
    shutil.copytree(lora_run / "adapter", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exc:
        generate.main(["--model", str(moved), "--prompt", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert error_lines(err) == [f"error: the base model {tmp_path / 'gone'} of the adapter in {moved} cannot be "
                                f"found (no such folder). HINT: put the base model back at {tmp_path / 'gone'}, or "
                                f"set base_model_name_or_path in {moved / 'adapter_config.json'} to where it is now"]


def test_generate_refuses_an_adapter_pointed_at_another_base_of_the_same_shapes(lora_run, tmp_path,
                                                                                tiny_model_dir, capsys):
    import generate

    trained_on = adapters.base_fingerprint(str(tiny_model_dir))
    for folder in (lora_run / "adapter", lora_run / "checkpoint-13"):
        assert json.loads((folder / "adapter_base.json").read_text())["base_fingerprint"] == trained_on
    other = tmp_path / "other-base"  # same config and shapes, other weights
    shutil.copytree(tiny_model_dir, other)
    build_tiny_model(other, vocab_size=json.loads((other / "config.json").read_text())["vocab_size"], seed=1)
    moved = tmp_path / "adapter"
    shutil.copytree(lora_run / "adapter", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other)
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exc:
        generate.main(["--model", str(moved), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert error_lines(err) == [f"error: the adapter in {moved} was trained on a base with fingerprint {trained_on}, "
                                f"but its base {other} has fingerprint {adapters.base_fingerprint(str(other))} (other "
                                f"weights or config). HINT: set base_model_name_or_path in "
                                f"{moved / 'adapter_config.json'} to the base it was trained on, or load the merged "
                                f"model its training run wrote"]


def test_gradient_checkpointing_trains_the_adapters_the_same(tmp_path, tiny_model_dir, tiny_data_dir):
    """The frozen embedding gives the checkpointed blocks an input without a gradient: the converter asks
    peft for one, else the adapters would get no gradient at all under --gradient-checkpointing."""
    runs = {}
    for name, extra in {"plain": [], "checkpointed": ["--gradient-checkpointing"]}.items():
        out = tmp_path / name
        assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "3", "--lora-r", "4",
                                 "--lora-dropout", "0", *extra)) == 0
        runs[name] = train_records(out)
    assert all(r["grad_norm"] > 0 for r in runs["checkpointed"])
    assert [r["loss"] for r in runs["checkpointed"]] == pytest.approx([r["loss"] for r in runs["plain"]], abs=1e-6)
    assert_trained_alike(adapter(tmp_path / "checkpointed" / "adapter"), adapter(tmp_path / "plain" / "adapter"),
                         [r["lr"] for r in runs["plain"]])
