"""Bad input that used to end in a traceback (issue 23, item 16): a plan of 10**12 steps, --num-samples far
beyond one generate call, and token ids beyond the model's vocabulary that meta.json does not admit."""
from __future__ import annotations

import contextlib
import io
import math

import finetune_generative as ft
from dataset import load_meta
from finetune import plan as plan_module
from finetune.config import parse_config
from helpers import base_args

TRILLION = 1_000_000_000_000


def test_a_dry_run_of_a_trillion_steps_prints_the_plan(tmp_path, tiny_model_dir, tiny_data_dir):
    args = base_args(tiny_model_dir, tiny_data_dir, tmp_path / "out", "--max-steps", TRILLION,
                     "--eval-every", "250", "--save-every", "500", "--dry-run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert ft.main(args) == 0
    printed = out.getvalue()
    epoch = plan_module.make_plan(parse_config(args)[0], load_meta(tiny_data_dir), 32, world_size=1).steps_per_epoch
    assert f"{epoch:,} per epoch, {TRILLION:,} total" in printed
    # every 250 steps and every epoch end (the last step is both); those of both counted once; and step 0;
    # less the epoch ends within a tenth of the shorter period of a multiple of 250 (issue 23 #8), which
    # repeat in each stretch of lcm(250, epoch) steps (the last step is a multiple of 250: no more near it)
    window, period = epoch // 10, math.lcm(250, epoch)
    near = lambda s: 0 < min(s % 250, 250 - s % 250) <= window  # noqa: E731
    full = TRILLION // period * period
    dropped = (TRILLION // period * sum(near(s) for s in range(epoch, period, epoch))
               + sum(near(s) for s in range(full + epoch, TRILLION, epoch)))
    count = TRILLION // 250 + TRILLION // epoch - TRILLION // period + 1 - dropped
    first = sorted(s for s in {*range(250, 1300, 250), *range(epoch, 1300, epoch)} if not near(s))[:5]
    assert f"at steps 0, {', '.join(map(str, first))}, ... ({count:,} in all)" in printed
    assert not (tmp_path / "out").exists()


def test_the_plan_answers_by_arithmetic_what_the_listed_steps_say(tiny_model_dir, tiny_data_dir):
    """evaluates_at/saves_at/count_evaluations agree with the listed steps, here small enough to list."""
    args = base_args(tiny_model_dir, tiny_data_dir, "unused", "--max-steps", "50", "--eval-every", "7",
                     "--save-every", "4")
    cfg, _ = parse_config(args)
    plan = plan_module.make_plan(cfg, load_meta(tiny_data_dir), 32, world_size=1)
    listed = plan_module.evaluation_steps(cfg, plan)
    assert [s for s in range(60) if plan.evaluates_at(s)] == listed
    assert plan_module.count_evaluations(cfg, plan) == len(listed)
    assert [s for s in range(60) if plan.saves_at(s)] == [*range(4, 50, 4), 50]

