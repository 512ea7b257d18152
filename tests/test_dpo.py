"""Preference tuning with DPO (issue 30): TRL's DPOTrainer as the reference (the same tokens, then losses,
rewards, accuracy and weights step by step), the ln 2 guard at step 0 and a wrong reference caught by it,
packed equals unpacked, exact resume on the saved reference, LoRA's reference (the base, adapter off).

Pairs are prepared by prepare_data.py from JSON lines with the tiny tokenizer; everything runs on the CPU in fp32.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import evaluate
import finetune_generative as ft
from finetune.data.dataset import load_meta
from finetune.data.pairs import PackedPairDataset
from finetune.evaluation.report import fmt
from finetune.train.objectives import preference
from helpers import (
    PAIR_BLOCK,
    assert_one_line_error,
    build_tiny_model,
    load_fp32_model,
    prepare_pairs,
    run_main,
    stored_pairs,
    style_pairs,
    train_records,
    trl_dpo_trainer,
)

LN2 = math.log(2.0)
TOLERANCE = 1e-5
LR = 1e-2
BLOCK = PAIR_BLOCK
N_TRAIN = 12


@pytest.fixture(scope="module")
def rows():
    return style_pairs(N_TRAIN, seed=1), style_pairs(4, seed=2)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory, tiny_model_dir, rows):
    return prepare_pairs(tmp_path_factory.mktemp("pairs"), tiny_model_dir, *rows)


def dpo_args(model_dir, data_dir, out, *extra) -> list[str]:
    """Every pair in each step (one micro-batch holds all blocks), constant lr, no warmup, dropout 0, fp32."""
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--output-dir", str(out),
            "--block-size", str(BLOCK), "--batch-size", "64", "--grad-accum", "1", "--max-steps", "3",
            "--lr", str(LR), "--scheduler", "constant", "--warmup-steps", "0", "--weight-decay", "0",
            "--dropout", "0", "--precision", "fp32", "--device", "cpu", "--num-workers", "0", "--log-every", "1",
            "--eval-every", "0", "--save-every", "0", "--save-total-limit", "0", "--seed", "3", *map(str, extra)]


# -----------------------------------------------------------------------------
# TRL's DPOTrainer as the reference


@pytest.mark.slow
def test_three_steps_match_trl_dpotrainer(tmp_path, tiny_model_dir, pair_data, rows):
    """Loss, rewards and accuracy at each of the first 3 steps within 1e-5 of DPOTrainer's (sigmoid, beta 0.1,
    precomputed reference, fp32, dropout 0, constant lr, every pair in each step), and the weights after them:
    our update and theirs agree to lr/10 in every element. Step 0 is ln 2."""
    out = tmp_path / "ours"
    assert ft.main(dpo_args(tiny_model_dir, pair_data, out)) == 0
    ours = train_records(out)
    step0 = train_records(out, "eval")[0]
    assert abs(step0["val_loss"] - LN2) <= 1e-6 and abs(ours[0]["loss"] - LN2) <= 1e-6

    trainer = trl_dpo_trainer(tmp_path, tiny_model_dir, rows[0])
    start = {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}
    trainer.train()
    theirs = [entry for entry in trainer.state.log_history if "loss" in entry and "rewards/chosen" in entry]
    assert len(ours) == len(theirs) == 3
    for mine, their in zip(ours, theirs):
        for key, trl_key in (("loss", "loss"), ("rewards_chosen", "rewards/chosen"),
                             ("rewards_rejected", "rewards/rejected"), ("rewards_margin", "rewards/margins"),
                             ("rewards_accuracy", "rewards/accuracies")):
            assert mine[key] == pytest.approx(their[trl_key], abs=TOLERANCE), (mine["step"], key)
    assert ours[-1]["rewards_accuracy"] > 0.5  # it learned something, so the comparison is not of zeros
    our_weights = load_file(out / "model.safetensors")
    for name, tensor in trainer.model.state_dict().items():
        if name in our_weights:
            ours_update, their_update = our_weights[name] - start[name], tensor - start[name]
            assert (ours_update - their_update).abs().max().item() <= LR / 10, name


# -----------------------------------------------------------------------------
# The reference and the guard


def test_wrong_reference_is_caught_at_step_zero(tmp_path, tiny_model_dir, pair_data, monkeypatch, capsys):
    """A reference from another model than the one trained (here: the starting weights nudged) stops the run
    with one line before any step."""
    original = preference.reference_table

    def from_another_model(model, *args, **kwargs):
        with torch.no_grad():
            weight = preference.unwrapped(model).get_input_embeddings().weight
            nudge = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
            weight += nudge
            try:
                return original(model, *args, **kwargs)
            finally:
                weight -= nudge

    monkeypatch.setattr(preference, "reference_table", from_another_model)
    result = run_main(ft.main, dpo_args(tiny_model_dir, pair_data, tmp_path / "out"), capsys)
    assert_one_line_error(result, "not ln 2", "reference log-probabilities")
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.slow
def test_reference_is_computed_once_and_read_back_on_resume(tmp_path, tiny_model_dir, pair_data, monkeypatch):
    """Resume equals uninterrupted (bitwise), and the resumed run reads the reference the run kept instead of
    computing it from the checkpoint (which is no longer the starting model)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--eval-every", "2"]
    assert ft.main(dpo_args(tiny_model_dir, pair_data, full, *args)) == 0
    assert (full / preference.REFERENCE_FILE).is_file()
    assert ft.main(dpo_args(tiny_model_dir, pair_data, cut, *args[:1], "2", *args[2:])) == 0
    computed = []
    monkeypatch.setattr(preference, "reference_table", lambda *a, **k: computed.append(1))
    assert ft.main(dpo_args(tiny_model_dir, pair_data, cut, *args, "--resume", "--extend")) == 0
    assert not computed
    assert [r["loss"] for r in train_records(cut)] == [r["loss"] for r in train_records(full)]
    for name, tensor in load_file(full / "model.safetensors").items():
        assert torch.equal(tensor, load_file(cut / "model.safetensors")[name]), name


@pytest.mark.parametrize("given", [None, "0.1"])
def test_dropout_is_off_unless_given(tmp_path, tiny_model_dir, pair_data, given):
    """As DPOTrainer: the reference has no dropout, so the policy has none unless --dropout asks for it; the
    choice is the run's recorded setting."""
    argv = dpo_args(tiny_model_dir, pair_data, tmp_path / "out", "--max-steps", 1)
    at = argv.index("--dropout")
    argv[at + 1:at + 2] = [given] if given else []
    if not given:
        del argv[at]
    assert ft.main(argv) == 0
    config = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert config["dropout"] == (float(given) if given else 0.0)
    model_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert model_config["resid_pdrop"] == (float(given) if given else 0.0)


def test_resume_without_the_kept_reference_is_refused(tmp_path, tiny_model_dir, pair_data, capsys):
    """Full fine-tuning: the checkpoint is no longer the starting model, so a lost reference file cannot be
    recomputed from it; one line, nothing trained."""
    out = tmp_path / "out"
    assert ft.main(dpo_args(tiny_model_dir, pair_data, out, "--max-steps", 1)) == 0
    (out / preference.REFERENCE_FILE).unlink()
    result = run_main(ft.main, dpo_args(tiny_model_dir, pair_data, out, "--max-steps", 2, "--resume", "--extend"),
                      capsys)
    assert_one_line_error(result, preference.REFERENCE_FILE, "missing", "--overwrite")
    assert len(train_records(out)) == 1


# -----------------------------------------------------------------------------
# Packing


def test_packed_pairs_have_the_logps_they_have_alone(tiny_model_dir, pair_data):
    """A pair's log-probabilities in a block packed with others equal those of the pair alone, unpadded (the
    positions restart and attention stays inside each sequence)."""
    meta = load_meta(pair_data)
    packed = PackedPairDataset.from_data_dir(pair_data, "train", BLOCK, meta)
    assert np.diff(packed.packing.block_offsets).max() > 1  # blocks hold several pairs
    model = load_fp32_model(tiny_model_dir).eval()
    batch = torch.utils.data.default_collate([packed[i] for i in range(len(packed))])
    with torch.no_grad():
        logps, held = preference.pair_logps(model, batch, torch.device("cpu"))
    by_number = dict(zip(batch["pairs"][held].tolist(), logps[held].tolist()))
    assert sorted(by_number) == list(range(N_TRAIN))
    for number, (prompt, chosen, rejected) in enumerate(stored_pairs(pair_data)):
        for which, completion in enumerate((chosen, rejected)):
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            alone = log_probs[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().item()
            # a sum of ~20 fp32 log-probabilities of ~-3 each: rounding bounded relative to the sum
            assert by_number[number][which] == pytest.approx(alone, rel=1e-6, abs=TOLERANCE)


def test_only_the_completions_positions_go_through_the_output_layer(tiny_model_dir, pair_data):
    """The output layer sees the hidden states of the scored positions only (not the prompts', the padding's), and
    the log-probabilities and their gradients equal those of the full logits."""
    meta = load_meta(pair_data)
    packed = PackedPairDataset.from_data_dir(pair_data, "train", BLOCK, meta)
    batch = torch.utils.data.default_collate([packed[i] for i in range(min(4, len(packed)))])
    model = load_fp32_model(tiny_model_dir).train()
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    logps, held = preference.pair_logps(model, batch, torch.device("cpu"))
    handle.remove()
    scored = int((batch["labels"] != -100).sum())
    assert seen == [torch.Size([scored, model.config.n_embd])] and scored < 0.9 * batch["labels"].numel()
    logps[held].sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    token = log_probs.gather(2, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    sums = torch.stack([torch.stack([token[b][batch["slot"][b, 1:] == k].sum() for k in range(2 * held.shape[1])])
                        for b in range(len(labels))]).view(logps.shape)
    assert torch.allclose(logps[held], sums[held].detach(), rtol=1e-6, atol=TOLERANCE)
    sums[held].sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_packed_training_equals_unpacked(tmp_path, tiny_model_dir, pair_data):
    """Per-step loss within 1e-5 whether pairs share blocks (64 tokens) or each has its own (the longest pair's
    length rounded up: one pair per block, as an unpacked batch)."""
    meta = load_meta(pair_data)
    longest = max(2 * len(p) + len(c) + len(r) for p, c, r in stored_pairs(pair_data))
    alone = PackedPairDataset.from_data_dir(pair_data, "train", longest, meta)
    assert len(alone) == N_TRAIN  # one pair per block
    packed = ft.main(dpo_args(tiny_model_dir, pair_data, tmp_path / "packed")) == 0
    unpacked = ft.main(dpo_args(tiny_model_dir, pair_data, tmp_path / "unpacked", "--block-size", longest)) == 0
    assert packed and unpacked
    for a, b in zip(train_records(tmp_path / "packed"), train_records(tmp_path / "unpacked"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE)


def test_long_pairs_cut_from_the_left_and_identical_leftovers_skipped():
    from finetune.data.pairs import fit_to_block, pack_pairs

    prompt, chosen, rejected = np.array([10, 10, 1]), np.array([3, 30, 30]), np.array([2, 30, 30])
    kept = fit_to_block(prompt, chosen, rejected, 32)
    assert [k.tolist() for k in kept] == [[10, 1, 1], [3, 15, 15], [2, 15, 15]]
    # two pairs whose completions agree on their first 15 tokens: the second is cut there, nothing to compare
    tokens, mask = [], []
    for completion_tail in ([6] * 30, [5] * 15 + [6] * 15):
        ids = [7] + [5] * 30 + completion_tail
        tokens += ids
        mask += [2] + [1] * 30 + [5] * 30
    packing = pack_pairs(np.array(tokens), np.array(mask, dtype=np.uint8), 32)
    assert (packing.examples, packing.truncated, packing.skipped) == (2, 2, 1)


# -----------------------------------------------------------------------------
# Resume across objectives


@pytest.mark.slow
def test_pairs_refused_for_a_resume_of_a_text_checkpoint(tmp_path, tiny_model_dir, tiny_data_dir, pair_data, capsys):
    out = tmp_path / "out"
    text_run = dpo_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "1", "--batch-size", "2",
                        "--block-size", "32")
    assert ft.main(text_run) == 0
    result = run_main(ft.main, dpo_args(tiny_model_dir, pair_data, out, "--resume"), capsys)
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "preference data" in line and "trained on text data" in line and "HINT" in line


# -----------------------------------------------------------------------------
# Processes and LoRA


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [(), ("--fsdp",)], ids=["ddp", "fsdp"])
def test_two_processes_train_pairs_like_one(tmp_path, tiny_model_dir, pair_data, sharding):
    """torchrun, 2 processes x batch 2 against 1 process x batch 4 (the same blocks in each step): the pairs
    of a step are counted over both ranks and the reference is computed in shares, so the losses, rewards and
    the updates agree; replicated (DDP) or sharded (FSDP, whose forward passes gather from both processes, so
    both run as many in the reference pass)."""
    from helpers import torchrun

    steps = ("--max-steps", 2, "--eval-every", 1)
    assert ft.main(dpo_args(tiny_model_dir, pair_data, tmp_path / "one", *steps, "--batch-size", 4)) == 0
    result = torchrun(2, *dpo_args(tiny_model_dir, pair_data, tmp_path / "two", *steps, "--batch-size", 2, *sharding))
    assert result.returncode == 0, result.stderr[-3000:]
    for kind, keys in (("train", ("loss", "rewards_chosen", "rewards_margin", "rewards_accuracy")),
                       ("eval", ("val_loss", "val_rewards_chosen", "val_rewards_accuracy"))):
        one, two = train_records(tmp_path / "one", kind), train_records(tmp_path / "two", kind)
        assert len(one) == len(two) >= 2
        for a, b in zip(one, two):
            for key in keys:
                assert b[key] == pytest.approx(a[key], abs=TOLERANCE), (kind, a["step"], key)
    assert abs(train_records(tmp_path / "two", "eval")[0]["val_loss"] - LN2) <= 1e-6
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    w_one, w_two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(w_one) == set(w_two) and set(w_one) <= set(start)
    for name in w_one:
        assert ((w_two[name] - start[name]) - (w_one[name] - start[name])).abs().max().item() <= LR / 10, name


@pytest.mark.slow
def test_lora_reference_is_the_base_with_the_adapter_off(tmp_path, tiny_model_dir, pair_data):
    """Under LoRA the reference is the base model (the adapter switched off): the kept reference equals the
    base model's log-probabilities, step 0 is ln 2, and the run trains (the loss moves off ln 2)."""
    out = tmp_path / "lora"
    assert ft.main(dpo_args(tiny_model_dir, pair_data, out, "--lora-r", 4, "--lora-dropout", 0)) == 0
    assert abs(train_records(out, "eval")[0]["val_loss"] - LN2) <= 1e-6
    assert abs(train_records(out)[0]["loss"] - LN2) <= 1e-6 and train_records(out)[-1]["loss"] < LN2 - 1e-3
    kept = np.load(out / preference.REFERENCE_FILE)["train"]
    meta = load_meta(pair_data)
    dataset = PackedPairDataset.from_data_dir(pair_data, "train", BLOCK, meta)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logps, held = preference.pair_logps(load_fp32_model(tiny_model_dir).eval(), batch, torch.device("cpu"))
    base = np.zeros_like(kept)
    base[batch["pairs"][held].numpy()] = logps[held].double().numpy()
    np.testing.assert_allclose(kept, base, rtol=1e-6, atol=TOLERANCE)


@pytest.mark.slow
def test_lora_matches_trl_dpotrainer_with_peft(tmp_path, tiny_model_dir, pair_data, rows, monkeypatch):
    """Under LoRA, against DPOTrainer given the same peft model (the same adapter at the start: ours,
    captured as it was made): losses, rewards and accuracy of 3 steps within 1e-5, adapter updates within lr/10.
    TRL's reference is then the base with the adapter disabled, as ours."""
    import copy

    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from finetune.train import lora

    made = {}
    to_lora = lora.to_lora

    def keep_the_start(*args, **kwargs):
        model, files = to_lora(*args, **kwargs)
        made["config"] = copy.deepcopy(model.peft_config["default"])
        made["adapter"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return model, files

    monkeypatch.setattr(lora, "to_lora", keep_the_start)
    out = tmp_path / "ours"
    assert ft.main(dpo_args(tiny_model_dir, pair_data, out, "--lora-r", 4, "--lora-dropout", 0)) == 0
    ours = train_records(out)

    peft_model = get_peft_model(load_fp32_model(tiny_model_dir), made["config"])
    set_peft_model_state_dict(peft_model, made["adapter"])
    trainer = trl_dpo_trainer(tmp_path, tiny_model_dir, rows[0], model=peft_model)
    trainer.train()
    theirs = [entry for entry in trainer.state.log_history if "loss" in entry and "rewards/chosen" in entry]
    assert len(ours) == len(theirs) == 3
    for mine, their in zip(ours, theirs):
        for key, trl_key in (("loss", "loss"), ("rewards_chosen", "rewards/chosen"),
                             ("rewards_rejected", "rewards/rejected"), ("rewards_accuracy", "rewards/accuracies")):
            assert mine[key] == pytest.approx(their[trl_key], abs=TOLERANCE), (mine["step"], key)
    assert ours[-1]["loss"] < LN2 - 1e-3  # the adapter moved
    our_adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    their_adapter = get_peft_model_state_dict(trainer.model)
    assert set(our_adapter) == set(their_adapter) == set(made["adapter"])
    for name, start in made["adapter"].items():
        ours_update, their_update = our_adapter[name] - start, their_adapter[name].detach() - start
        assert (ours_update - their_update).abs().max().item() <= LR / 10, name


@pytest.fixture(scope="module")
def style_run(tmp_path_factory, tiny_model_dir):
    """(held-out pairs, their data folder, the output of 15 DPO steps on pairs that prefer one style)."""
    folder = tmp_path_factory.mktemp("style")
    val = style_pairs(16, seed=2)
    data = prepare_pairs(folder, tiny_model_dir, style_pairs(48, seed=1), val)
    out = folder / "out"
    assert ft.main(dpo_args(tiny_model_dir, data, out, "--max-steps", 15)) == 0
    return val, data, out


@pytest.mark.slow
def test_pairs_that_prefer_a_style_move_greedy_answers_toward_it(tiny_model_dir, style_run):
    """Every chosen answer ends "the captain said", no rejected one does: after 15 steps the held-out reward
    accuracy is above 0.9 (0 at step 0: no pair is preferred yet) and greedy answers to held-out prompts use the
    phrase, where the starting model's never do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    val, data, out = style_run
    evals = train_records(out, "eval")
    assert evals[0]["val_rewards_accuracy"] == 0.0 and evals[-1]["val_rewards_accuracy"] > 0.9
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def answers_in_style(folder) -> int:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        count = 0
        for row in val:
            ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
            with torch.no_grad():
                answer = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
            count += "said" in tokenizer.decode(answer)
        return count

    assert answers_in_style(tiny_model_dir) == 0
    assert answers_in_style(out) >= len(val) // 4  # 9 of 16 measured
    # the function evaluation code reuses: per-pair log-probabilities of a split, for any model
    from finetune.runtime.distributed import DistInfo

    dataset = PackedPairDataset.from_data_dir(data, "val", BLOCK, load_meta(data))
    tables = [preference.logps_table(load_fp32_model(folder), dataset, 8, contextlib.nullcontext(),
                                     torch.device("cpu"), DistInfo()) for folder in (tiny_model_dir, out)]
    ratios = tables[1] - tables[0]
    assert float(np.mean(ratios[:, 0] > ratios[:, 1])) == pytest.approx(evals[-1]["val_rewards_accuracy"])


# -----------------------------------------------------------------------------
# evaluate.py on pairs, and the report card of a DPO run


def plain_pair_logps(model, pairs) -> np.ndarray:
    """(log p(chosen), log p(rejected)) of each (prompt, chosen, rejected) ids, each sequence run alone through
    the model, unpacked and unpadded: the independent computation evaluate.py's figures are checked against."""
    table = []
    for prompt, chosen, rejected in pairs:
        row = []
        for completion in (chosen, rejected):
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            row.append(log_probs[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().item())
        table.append(row)
    return np.array(table)


def evaluate_pairs(models, data, out, capsys) -> tuple[dict, str]:
    argv = [arg for model in models for arg in ("--model", model)]
    result = run_main(evaluate.main, [*argv, "--data-dir", data, "--device", "cpu", "--precision", "fp32",
                                      "--output", out], capsys)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "eval.json").read_text(encoding="utf-8")), result.stdout


def test_evaluate_preference_accuracy_equals_a_plain_loop_over_the_pairs(tmp_path, tiny_model_dir, pair_data, capsys):
    """evaluate.py --data-dir PAIRS on the starting model and a 3-step DPO run: each val pair's margin equals a
    plain loop's (each sequence alone, no packing) within 1e-6 of the log-probabilities' size; the accuracy,
    the means and DPO's reward accuracy against the first model follow from them."""
    out = tmp_path / "dpo"
    assert ft.main(dpo_args(tiny_model_dir, pair_data, out)) == 0
    report, stdout = evaluate_pairs([tiny_model_dir, out], pair_data, tmp_path / "eval", capsys)
    entry = report["evaluations"][0]
    assert entry["kind"] == "preference pairs" and "preference accuracy" in stdout and "reward accuracy" in stdout
    pairs = stored_pairs(pair_data, "val")
    tables = [plain_pair_logps(load_fp32_model(folder).eval(), pairs) for folder in (tiny_model_dir, out)]
    for model, table in zip(report["models"], tables):
        result = entry["results"][model["label"]]
        figures = result["figures"]
        assert figures["pairs"] == len(pairs) and figures["truncated"] == figures["skipped"] == 0
        assert figures["block_size"] == BLOCK  # the run's, for both models
        assert "perplexity" not in figures and "bits_per_byte" not in figures
        margins = table[:, 0] - table[:, 1]
        assert [d["name"] for d in result["documents"]] == [f"pair {i}" for i in range(len(pairs))]
        for doc, (chosen, rejected), margin in zip(result["documents"], table, margins):
            # sums of ~20 fp32 log-probabilities: the rounding is bounded relative to their size
            bound = 1e-6 * (abs(chosen) + abs(rejected))
            assert abs(doc["margin"] - margin) <= bound and abs(doc["logp_chosen"] - chosen) <= bound
        assert figures["preference_accuracy"] == float(np.mean((margins > 0) + 0.5 * (margins == 0)))
        assert figures["margin"] == pytest.approx(margins.mean(), rel=1e-6)
        assert figures["logps_chosen"] == pytest.approx(table[:, 0].mean(), rel=1e-6)
        assert figures["logps_rejected"] == pytest.approx(table[:, 1].mean(), rel=1e-6)
    ratios = tables[1] - tables[0]
    later = entry["results"][report["models"][1]["label"]]["figures"]
    assert "reward_accuracy" not in entry["results"][report["models"][0]["label"]]["figures"]
    assert later["reward_accuracy"] == float(np.mean(ratios[:, 0] - ratios[:, 1] > 0))
    # the run's own last val reward accuracy, on the same pairs with the same reference
    assert later["reward_accuracy"] == pytest.approx(train_records(out, "eval")[-1]["val_rewards_accuracy"])
    assert "preference accuracy" in (tmp_path / "eval" / "eval.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_evaluate_shows_preference_accuracy_rising_after_dpo(tiny_model_dir, style_run, tmp_path, capsys):
    """The user's story: `evaluate.py --model BASE --model OUT --data-dir PAIRS` after DPO on pairs that prefer
    one style: the held-out preference accuracy rises from the base's, and nearly every pair is won against it."""
    val, data, out = style_run
    report, stdout = evaluate_pairs([tiny_model_dir, out], data, tmp_path / "eval", capsys)
    base, tuned = (report["evaluations"][0]["results"][m["label"]]["figures"] for m in report["models"])
    assert base["pairs"] == tuned["pairs"] == len(val)
    assert tuned["preference_accuracy"] > base["preference_accuracy"] + 0.25
    assert tuned["margin"] > base["margin"] and tuned["reward_accuracy"] > 0.9
    row = next(line for line in stdout.splitlines() if "preference accuracy" in line)
    assert fmt(base["preference_accuracy"]) in row and fmt(tuned["preference_accuracy"]) in row


@pytest.mark.slow
def test_dpo_run_writes_a_report_card_and_a_model_card_of_its_rewards(style_run):
    """The end of a DPO run: report_card.json holds the val DPO loss, reward accuracy and margin of each eval
    record (no perplexity or bits per byte: pairs are no text), and README.md loads with huggingface_hub with
    them as its metrics."""
    from huggingface_hub import ModelCard

    _, _, out = style_run
    evals = train_records(out, "eval")
    report = json.loads((out / "report_card.json").read_text(encoding="utf-8"))
    labels = [m["label"] for m in report["models"]]
    assert labels[0] == "base (step 0)" and labels[-1].startswith("final")
    results = report["evaluations"][0]["results"]
    for label, record in ((labels[0], evals[0]), (labels[-1], evals[-1])):
        figures = results[label]["figures"]
        assert figures["dpo_loss"] == record["val_loss"]
        assert figures["reward_accuracy"] == record["val_rewards_accuracy"]
        assert figures["reward_margin"] == record["val_rewards_margin"]
        assert not {"loss", "perplexity", "bits_per_byte"} & set(figures)
    assert results[labels[0]]["figures"]["dpo_loss"] == pytest.approx(LN2, abs=1e-6)
    card = ModelCard.load(out / "README.md")
    assert "preference" in card.data.tags
    by_type = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_type == pytest.approx({"dpo_loss": evals[-1]["val_loss"], "reward_accuracy":
                                     evals[-1]["val_rewards_accuracy"], "reward_margin": evals[-1]["val_rewards_margin"]},
                                    abs=1e-6)
    assert "perplexity" not in card.text and "reward accuracy" in card.text
    assert f"--data-dir {data_dir_of(out)}" in card.text


def data_dir_of(out: Path) -> str:
    return json.loads((out / "train_config.json").read_text(encoding="utf-8"))["data_dir"]


@pytest.mark.slow
def test_pairs_evaluated_on_a_model_with_a_shorter_context_than_the_runs_blocks_is_one_line(
        tmp_path, tiny_model_dir, style_run, capsys):
    """A model whose context is shorter than the blocks the run scored its pairs in: one line, before any
    weights load, nothing written."""
    from transformers import AutoTokenizer

    _, data, out = style_run
    short = tmp_path / "short"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(short)
    build_tiny_model(short, vocab_size=len(AutoTokenizer.from_pretrained(tiny_model_dir)), n_positions=32)
    result = run_main(evaluate.main, ["--model", out, "--model", short, "--data-dir", data, "--device", "cpu",
                                      "--output", tmp_path / "eval"], capsys)
    assert_one_line_error(result, f"the {BLOCK}-token blocks of the run of {out}", "context of", "(32 tokens)",
                          "HINT: evaluate")
    assert not (tmp_path / "eval").exists()


def test_pairs_with_nothing_left_to_compare_in_the_models_context_is_one_line(tmp_path, tiny_model_dir, capsys):
    """Every val pair's completions start alike, and a model of 4 positions keeps one token of each: no pair
    is left to compare, which is one line, not a table of empty figures."""
    from transformers import AutoTokenizer

    alike = [{"prompt": "a b:", "chosen": " the sea one", "rejected": " the sea two"}] * 2
    data = prepare_pairs(tmp_path, tiny_model_dir, style_pairs(4, seed=1), alike)
    tiny = tmp_path / "tiny4"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tiny)
    build_tiny_model(tiny, vocab_size=len(AutoTokenizer.from_pretrained(tiny_model_dir)), n_positions=4)
    result = run_main(evaluate.main, ["--model", tiny, "--data-dir", data, "--device", "cpu",
                                      "--output", tmp_path / "eval"], capsys)
    assert_one_line_error(result, "holds no pair left to compare in blocks of 4 tokens (2 pair(s) in the split)",
                          "HINT: evaluate models with a longer context")
    assert not (tmp_path / "eval" / "eval.json").exists()
