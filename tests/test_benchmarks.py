"""The benchmark scripts must keep running: each at a tiny size (figures are not checked here)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script, argv",
    [
        ("selection_cost.py", ["--hidden", "64", "--layers", "3", "--vocab", "512", "--repeats", "1"]),
        ("pio_proxy_cost.py", ["--hidden", "64", "--heads", "2", "--layers", "4", "--vocab", "512", "--visual", "576",
                               "--text", "16", "--repeats", "1", "--skip-memory", "--tp-hidden", "64",
                               "--tp-batch", "2", "--tp-new-tokens", "2", "--tp-repeats", "1"]),
        ("prefill_speedup.py", ["--hidden", "64", "--layers", "16", "--vocab", "512", "--visual", "64", "--text", "16",
                                "--budgets", "16", "--repeats", "1", "--warmup", "0", "--generate-tokens", "2"]),
        ("prefill_speedup.py", ["--hidden", "64", "--layers", "16", "--vocab", "512", "--visual", "16", "--images", "3",
                                "--text", "8", "--budgets", "16", "--selectors", "pio_fvlm", "--no-fastv-compare",
                                "--repeats", "1", "--warmup", "0", "--generate-tokens", "0"]),
    ],
)
def test_benchmark_runs_at_tiny_size(script, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    except SystemExit as done:  # scripts that end with sys.exit(main())
        assert done.code in (0, None)
    out = capsys.readouterr().out
    assert "pio" in out.lower() and "not installed" not in out
    if "--images" in argv:  # several images per prompt: LLaVA-NeXT-sized visual spans
        assert "3 x 16 visual tokens" in " ".join(out.split())


def test_faithfulness_benchmark_runs_at_tiny_size(monkeypatch, capsys):
    argv = ["--prompts", "1", "--budgets", "64", "--only", "sparsevlm_averages_llava15_7b", "dart_pivot_order",
            "sparsevlm_plus_gravity_sign_distance"]
    monkeypatch.setattr(sys, "argv", ["faithfulness.py", *argv])
    try:
        runpy.run_path(str(BENCH / "faithfulness.py"), run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None)
    out = capsys.readouterr().out
    assert '"printed": 64.81' in out and '"sparsevlm_plus_gravity_sign_distance": 1707' in out
