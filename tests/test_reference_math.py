"""Our training loop does the same math as transformers.Trainer (the reference), step for step.

Both train the tiny GPT-2 from the same weights on the same batches in the same order, with
AdamW (fused), the same hyperparameters and weight-decay groups, the same linear warmup/decay
and gradient clipping, fp32 on CPU, dropout 0. The Trainer is handed our optimizer and schedule
(finetune.train.plan.make_scheduler: transformers' linear schedule, but warmup step k of W at peak x k / W
instead of starting at lr 0); test_weight_decay_groups_and_optimizer_match_trainer shows the optimizer
is the one the Trainer would build itself, and test_schedule_is_transformers_after_the_warmup pins
where the schedule differs from the Trainer's own. The runs cross an epoch boundary, whose last
step holds a short micro-batch, so the reshuffle and the token weighting are covered too.

The one difference found is a Trainer bug, not a choice: for GPT2LMHeadModel (its class name has
no "ForCausalLM", so `model.loss_type` is None) transformers 5.x divides the summed loss by all
B*T labels instead of the B*(T-1) predictions. The comparison sets loss_type = "ForCausalLM" so
the Trainer counts like a causal LM, and test_trainer_counts_one_label_too_many_per_row_for_gpt2
pins the difference itself.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import finetune_generative as ft
from dataset import EpochShuffleSampler, TextDataset
from finetune.models.loading import make_optimizer
from finetune.train.config import TrainConfig
from finetune.train.plan import make_scheduler
from helpers import BLOCK, assert_trained_alike, base_args, train_records

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

SEED = 11  # base_args' --seed
STEPS = 20
HYPER = dict(lr=3e-3, weight_decay=0.01, beta1=0.9, beta2=0.999, warmup_steps=3, max_grad_norm=1.0)
LOSS_TOLERANCE = 1e-5  # fp32 on CPU; in practice the losses agree to the last bit or within 1e-7


class SameOrderTrainer(Trainer):
    """The Trainer, fed our data order: EpochShuffleSampler(seed) instead of its own RandomSampler.

    accelerate's DataLoaderShard.set_epoch forwards the Trainer's epoch to the sampler, so each
    epoch is reshuffled exactly as our loop reshuffles it.
    """

    def _get_train_sampler(self, train_dataset=None):
        self.order_sampler = EpochShuffleSampler(len(self.train_dataset), seed=SEED)
        return self.order_sampler


def our_args(model_dir, data_dir, out, batch_size: int, grad_accum: int, steps: int = STEPS) -> list[str]:
    return base_args(model_dir, data_dir, out, "--max-steps", steps, "--batch-size", batch_size,
                     "--grad-accum", grad_accum, "--dropout", 0, "--scheduler", "linear", "--lr", HYPER["lr"],
                     "--weight-decay", HYPER["weight_decay"], "--beta1", HYPER["beta1"], "--beta2", HYPER["beta2"],
                     "--warmup-steps", HYPER["warmup_steps"], "--max-grad-norm", HYPER["max_grad_norm"])


def trainer_args(out, batch_size: int, grad_accum: int, steps: int = STEPS) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        max_steps=steps, learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"],
        adam_beta1=HYPER["beta1"], adam_beta2=HYPER["beta2"], adam_epsilon=1e-8, optim="adamw_torch_fused",
        lr_scheduler_type="linear", warmup_steps=HYPER["warmup_steps"], max_grad_norm=HYPER["max_grad_norm"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, seed=SEED, disable_tqdm=True)


def reference_model(model_dir, count_like_causal_lm: bool = True):
    """The tiny model with dropout 0 (as our --dropout 0), so neither run draws random numbers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, resid_pdrop=0.0,
                                                 embd_pdrop=0.0, attn_pdrop=0.0)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    assert model.loss_type is None  # GPT2LMHeadModel: the Trainer's causal-LM token count is skipped
    if count_like_causal_lm:
        model.loss_type = "ForCausalLM"
    return model


def trainer_step_logs(trainer) -> list[dict]:
    """Per-step logs. log_history keeps the exact floats; only the console print rounds them."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_weight_decay_groups_and_optimizer_match_trainer(tiny_model_dir, tmp_path):
    """Ours decays params with dim >= 2; the Trainer all but biases and LayerNorm: for GPT-2, the same set."""
    model = reference_model(tiny_model_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = TrainConfig(**HYPER)
    ours = make_optimizer(model, torch.device("cpu"), lr=cfg.lr, weight_decay=cfg.weight_decay,
                          betas=(cfg.beta1, cfg.beta2))
    trainer = Trainer(model=model, args=trainer_args(tmp_path, batch_size=8, grad_accum=1))
    theirs = trainer.create_optimizer()

    def groups(optimizer):
        return sorted((frozenset(names[id(p)] for p in g["params"]), g["weight_decay"], g["lr"], tuple(g["betas"]),
                       g["eps"], g["fused"], g["amsgrad"], g["maximize"]) for g in optimizer.param_groups)

    assert groups(ours) == groups(theirs)
    decayed = {names[id(p)] for g in ours.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    # The Trainer also names lm_head.weight, which is the same tensor as the (tied) wte.weight.
    their_names = set(trainer.get_decay_parameter_names(model))
    assert their_names - decayed == {"lm_head.weight"} and model.lm_head.weight is model.transformer.wte.weight
    assert decayed == their_names - {"lm_head.weight"}
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert not any("bias" in n or ".ln_" in n for n in decayed)
    assert len(decayed) == 2 + 4 * model.config.n_layer  # wte, wpe + 4 matrices per block (lm_head is tied)


def test_schedule_is_transformers_after_the_warmup(tmp_path):
    """make_scheduler vs the Trainer's own linear schedule: during warmup step k of W gets peak x k / W
    (the Trainer's gets peak x (k - 1) / W, so its step 1 trains at lr 0); from step W + 1 on they agree."""
    def lrs(scheduler, optimizer):
        values = []
        for _ in range(STEPS):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, batch_size=8, grad_accum=1))
    theirs_optimizer = trainer.create_optimizer()
    theirs = lrs(trainer.create_scheduler(STEPS, theirs_optimizer), theirs_optimizer)
    ours_optimizer = torch.optim.AdamW(model.parameters(), lr=HYPER["lr"])
    ours = lrs(make_scheduler("linear", ours_optimizer, HYPER["warmup_steps"], STEPS), ours_optimizer)
    warmup, peak = HYPER["warmup_steps"], HYPER["lr"]
    assert theirs[0] == 0.0 and min(ours) > 0
    assert ours[:warmup] == pytest.approx([peak * k / warmup for k in range(1, warmup + 1)], rel=1e-12)
    assert theirs[:warmup] == pytest.approx([peak * (k - 1) / warmup for k in range(1, warmup + 1)], abs=1e-15)
    assert ours[warmup:] == theirs[warmup:]


def batch_size_for(n_blocks: int, grad_accum: int) -> tuple[int, int]:
    """(micro-batch size, steps per epoch) such that the run crosses an epoch boundary whose last
    micro-batch is short: the reshuffle and the token weighting of a short batch are then compared too."""
    for sequences_per_step in (24, 28, 20, 30, 26, 22):
        batch_size = sequences_per_step // grad_accum
        steps_per_epoch = math.ceil(math.ceil(n_blocks / batch_size) / grad_accum)
        if n_blocks % batch_size and steps_per_epoch < STEPS:
            return batch_size, steps_per_epoch
    raise AssertionError(f"no batch size crosses an epoch with a short batch for {n_blocks} blocks")


@pytest.mark.parametrize("grad_accum", [1, 2], ids=["accum1", "accum2"])
def test_same_losses_and_weights_as_trainer(tiny_model_dir, tiny_data_dir, tmp_path, grad_accum):
    train_set = TextDataset.from_data_dir(tiny_data_dir, "train", BLOCK)
    batch_size, steps_per_epoch = batch_size_for(len(train_set), grad_accum)

    out = tmp_path / "ours"
    assert ft.main(our_args(tiny_model_dir, tiny_data_dir, out, batch_size, grad_accum)) == 0
    ours = train_records(out)

    model = reference_model(tiny_model_dir)
    optimizer = make_optimizer(model, torch.device("cpu"), lr=HYPER["lr"], weight_decay=HYPER["weight_decay"],
                               betas=(HYPER["beta1"], HYPER["beta2"]))
    trainer = SameOrderTrainer(model=model, train_dataset=train_set,
                               args=trainer_args(tmp_path / "trainer", batch_size, grad_accum),
                               optimizers=(optimizer, make_scheduler("linear", optimizer, HYPER["warmup_steps"], STEPS)))
    trainer.train()
    theirs = trainer_step_logs(trainer)
    assert theirs[0]["learning_rate"] == pytest.approx(HYPER["lr"] / HYPER["warmup_steps"])  # not 0
    assert trainer.order_sampler.epoch == 1  # the Trainer reshuffled for epoch 1 through our sampler

    assert [r["step"] for r in ours] == [t["step"] for t in theirs] == list(range(1, STEPS + 1))
    for a, b in zip(ours, theirs):
        assert isinstance(b["loss"], float)
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOLERANCE), (a, b)
        # Both log the lr the step used (before the scheduler steps) and the norm before clipping.
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-12, abs=1e-15), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a, b)
        # By design: our "epoch" counts finished epochs, the Trainer's is fractional.
        assert a["epoch"] == math.floor(b["epoch"] + 1e-9), (a, b)
        assert a["epoch_progress"] == pytest.approx(b["epoch"], abs=1e-6), (a, b)  # the fractional one, added
    assert [r["epoch"] for r in ours].index(1) == steps_per_epoch - 1

    ours_final = load_file(out / "model.safetensors")
    theirs_final = trainer.model.state_dict()
    assert set(theirs_final) - set(ours_final) == {"lm_head.weight"}  # tied to wte, not saved twice
    assert_trained_alike(ours_final, {name: theirs_final[name] for name in ours_final}, [r["lr"] for r in ours])
    assert not torch.equal(ours_final["transformer.wte.weight"],
                           load_file(tiny_model_dir / "model.safetensors")["transformer.wte.weight"])


def test_trainer_counts_one_label_too_many_per_row_for_gpt2(tiny_model_dir, tiny_data_dir, tmp_path):
    """The difference we work around above, pinned: with GPT-2's default loss_type (None) the Trainer
    divides the summed loss by B*T labels, though the shifted loss has only B*(T-1) predictions, so
    its loss (and gradient) is (T-1)/T of the true mean. Our loop divides by the predictions.

    If this fails because the two now agree, transformers fixed the count for GPT-2: drop the
    loss_type workaround in reference_model().
    """
    train_set = TextDataset.from_data_dir(tiny_data_dir, "train", BLOCK)
    batch_size = 8
    first = EpochShuffleSampler(len(train_set), seed=SEED).epoch_order()[:batch_size]
    input_ids = torch.stack([train_set[i]["input_ids"] for i in first])
    model = reference_model(tiny_model_dir, count_like_causal_lm=False)
    with torch.no_grad():
        true_mean = model(input_ids=input_ids, labels=input_ids).loss.item()  # what our loop logs at step 1

    trainer = SameOrderTrainer(model=model, train_dataset=train_set,
                               args=trainer_args(tmp_path, batch_size, grad_accum=1, steps=1))
    trainer.train()
    (logged,) = trainer_step_logs(trainer)
    assert logged["loss"] == pytest.approx(true_mean * (BLOCK - 1) / BLOCK, rel=1e-6)
    assert abs(logged["loss"] - true_mean) > 100 * LOSS_TOLERANCE
