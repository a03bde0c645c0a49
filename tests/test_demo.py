"""The README's main command: `fvlm demo` runs a pruned generate on a built-in tiny backbone."""
from fvlm.cli import main


def test_demo_runs_every_default_selector(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["demo", "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "(unpruned)" in out and "random" in out and "[16, 32]" in out


def test_demo_with_selector_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["demo", "--family", "qwen2_vl", "--selector", "uniform", "--set", "keep=4", "--tokens", "2"]) == 0
    assert "[4, 4]" in capsys.readouterr().out


def test_demo_runs_on_a_new_family(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["demo", "--family", "qwen3_vl", "--selector", "fastv", "--set", "keep=4", "--tokens", "2"]) == 0
    assert "[10.0, 18.0]" in capsys.readouterr().out  # 16 and 32 visual tokens, 4 kept after layer 2 of 4
    assert main(["demo", "--family", "gemma3"]) == 2
    assert "unknown tiny family 'gemma3'" in capsys.readouterr().err


def test_demo_bad_option_is_a_clear_error(capsys):
    assert main(["demo", "--selector", "random", "--set", "keep"]) == 2  # usage error
    assert "KEY=VALUE" in capsys.readouterr().err


def test_demo_checks_the_selector_before_building_a_model(capsys, monkeypatch):
    import fvlm.adapters.tiny

    built = []
    monkeypatch.setattr(fvlm.adapters.tiny, "tiny_model", lambda *a, **k: built.append(a))
    assert main(["demo", "--selector", "nosuch"]) == 2
    assert main(["demo", "--selector", "random", "--set", "keep=-1"]) == 2
    assert not built and "unknown selector 'nosuch'" in capsys.readouterr().err
