"""finetune/core/errors.py: a Ctrl-C during start-up is one line and exit 130; a long exception message becomes one
line cut at a word."""
from __future__ import annotations

import pickle

import finetune_generative as ft
from finetune.core.errors import first_line
from helpers import base_args, run_main


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, tiny_model_dir, tiny_data_dir, capsys,
                                                         monkeypatch):
    def interrupted(*args, **kwargs):  # what Python's own SIGINT handler raises wherever the program is
        raise KeyboardInterrupt

    monkeypatch.setattr("finetune.data.dataset.data_fingerprint", interrupted)  # reading the token files at start-up
    out = tmp_path / "out"
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out), capsys)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["error: interrupted (Ctrl-C) while starting, before any work was done. "
                                          "HINT: run the same command again"]
    assert not out.exists()



def test_first_line_cuts_long_messages_at_a_word():
    message = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
               "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` "
               "will likely succeed.\nmore")
    line = first_line(pickle.UnpicklingError(message))
    assert line.endswith(" ...") and len(line) <= 164
    kept = line[: -len(" ...")]
    assert message.startswith(kept) and message[len(kept)] == " "  # whole words only
    assert first_line(ValueError("short. ")) == "short" and first_line(ValueError("")) == "ValueError"
