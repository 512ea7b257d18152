"""finetune/runtime/device.py: --precision auto on a CPU with bf16 instructions picks bf16 only where a matmul probe
shows it faster, and remembers the measurement in the cache."""
from __future__ import annotations

import json

import torch


def test_precision_auto_on_a_bf16_cpu_measures_and_remembers(tmp_path, monkeypatch, caplog):
    import logging

    from finetune.runtime import device as runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # the CPU flag says bf16 (avx512_bf16)
    monkeypatch.setattr(runtime, "PROBE_SECONDS", 0.02, raising=False)
    log = logging.getLogger("finetune.test-precision")
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=log.name):
        choice = runtime.resolve_precision("auto", cpu, hidden_size=64, log=log)
    cache = tmp_path / "xdg-cache" / "finetune" / "cpu-precision.json"
    ((key, measured),) = json.loads(cache.read_text()).items()
    assert "hidden 64" in key and f"torch {torch.__version__}" in key
    assert choice == ("bf16" if measured["bf16"] > 1.1 * measured["fp32"] else "fp32")
    assert (f"runs at {measured['bf16']:.0f} GFLOP/s in bf16, {measured['fp32']:.0f} in fp32 (measured now): "
            f"{choice}") in caplog.text
    assert "remembered" not in caplog.text and "earlier" not in caplog.text

    def measuring_again(*args):
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(runtime, "matmul_gflops", measuring_again)
    for figures, expected, when in (({"fp32": 293.0, "bf16": 164.0}, "fp32", "earlier"),  # a cache without dates
                                    ({"fp32": 100.0, "bf16": 400.0, "measured": "2026-01-02"}, "bf16", "on 2026-01-02")):
        cache.write_text(json.dumps({key: figures}))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=log.name):
            assert runtime.resolve_precision("auto", cpu, hidden_size=64, log=log) == expected
        # Read back, not measured: the line says so, and where the figures are kept.
        assert (f"runs at {figures['bf16']:.0f} GFLOP/s in bf16, {figures['fp32']:.0f} in fp32 "
                f"(measured {when}, remembered in {cache}; delete it to measure again): {expected}") in caplog.text
        assert "measured now" not in caplog.text
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # asked for: no probe
