"""finetune/train/strategies/: the strategy each set of flags gets, and what each answers without loading a model
(the runs end to end are in test_lora.py, test_fsdp.py and test_finetune.py)."""
from __future__ import annotations

import pytest

from finetune.train import fsdp
from finetune.train.config import TrainConfig
from finetune.train.strategies import settings_problems, strategy_for


@pytest.mark.parametrize("flags,name", [({}, "full"), ({"lora_r": 4}, "lora"), ({"fsdp": True}, "fsdp")])
def test_the_flags_choose_one_strategy(flags, name):
    strategy = strategy_for(TrainConfig(**flags))
    assert strategy.name == name
    assert strategy.sharded == (name == "fsdp")
    assert strategy.trains_adapters == (name == "lora")
    # LoRA and FSDP checkpoints hold no full model: the weights load from --model, whatever a resume continues
    assert strategy.weights_source("CHECKPOINT") == ("CHECKPOINT" if name == "full" else TrainConfig().model)


def test_lora_with_fsdp_is_refused_by_the_settings():
    problems = settings_problems(TrainConfig(lora_r=4, fsdp=True))
    assert len(problems) == 1 and problems[0].startswith("--fsdp with --lora-r is not supported")
    assert settings_problems(TrainConfig(lora_r=4)) == settings_problems(TrainConfig(fsdp=True)) == []


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_only_fsdp_refuses_fp16(precision):
    refusal = strategy_for(TrainConfig(fsdp=True)).precision_problem(precision)
    assert (refusal is not None) == (precision == "fp16")
    assert refusal is None or refusal.startswith("--fsdp runs in fp32 or bf16, not fp16")
    assert strategy_for(TrainConfig()).precision_problem(precision) is None
    assert strategy_for(TrainConfig(lora_r=4)).precision_problem(precision) is None


def test_only_a_sharded_checkpoint_is_rescaled_to_another_world_size():
    cfg = TrainConfig(fsdp=True, batch_size=4, grad_accum=1)
    state = {"sharded": True, "world_size": 2}
    strategy = strategy_for(cfg)
    rescaled, problem = strategy.resumed_config(cfg, state, 4, explicit=set())
    assert problem is None and (rescaled.batch_size, rescaled.grad_accum) == (2, 1)  # global batch 8 kept
    assert (rescaled, problem) == fsdp.rescaled_for_world_size(cfg, state, 4, set())
    assert strategy.reshards(state) and not strategy.reshards({"world_size": 2})
    assert strategy.resumed_config(cfg, {"world_size": 2}, 4, set()) == (cfg, None)
    full = TrainConfig(batch_size=4)
    assert strategy_for(full).resumed_config(full, state, 4, set()) == (full, None)


def test_fsdp_resumes_only_sharded_checkpoints():
    assert strategy_for(TrainConfig(fsdp=True)).resume_problems({"sharded": False})[0].startswith(
        "--fsdp: the checkpoint was written without --fsdp")
    assert strategy_for(TrainConfig(fsdp=True)).resume_problems({"sharded": True}) == []
    assert strategy_for(TrainConfig()).resume_problems({"sharded": True}) == []


def test_the_lora_row_of_the_model_card():
    assert strategy_for(TrainConfig(lora_r=8, lora_alpha=16.0, lora_dropout=0.1)).card_rows() == [
        ("LoRA", "r 8, alpha 16, dropout 0.1")]
    assert strategy_for(TrainConfig(lora_r=4)).card_rows() == [("LoRA", "r 4, alpha 8, dropout 0.05")]  # the defaults peft got
    assert strategy_for(TrainConfig()).card_rows() == strategy_for(TrainConfig(fsdp=True)).card_rows() == []


def test_a_lora_runs_model_card_says_lora(tmp_path, tiny_model_dir, tiny_data_dir):
    """The card asks the run's strategy: peft as the library, the lora tag, the LoRA row of its settings."""
    pytest.importorskip("peft")
    import finetune_generative as ft
    from helpers import base_args

    out = tmp_path / "lora"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "2", "--lora-r", "4",
                             "--lora-dropout", "0")) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and "- lora" in card and "(LoRA, merged into the base)" in card
    assert "| LoRA | r 4, alpha 8, dropout 0 |" in card  # the alpha peft got: 2 x r by default
