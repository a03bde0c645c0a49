"""Entry-point registry: discovery, laziness, broken / duplicate plugins, creation, ``fvlm list``.

Fake distributions are ``*.dist-info`` folders (METADATA + entry_points.txt) in a temporary
directory put on ``sys.path``; importlib.metadata finds them as if they were installed.
"""
from __future__ import annotations

import sys
import textwrap

import pytest

from fvlm import registry
from fvlm.cli import main
from fvlm.errors import (
    DuplicateNameError,
    FVLMError,
    InvalidParameterError,
    PluginLoadError,
    UnknownAdapterError,
    UnknownSelectorError,
    UnsupportedModelError,
)
from fvlm.selectors.base import Stage, TokenSelector

TINY = '''
import torch
from fvlm.selectors.base import Stage, TokenSelector

class Tiny(TokenSelector):
    """A tiny test selector.

    Keeps the first ``keep`` tokens.
    """

    def __init__(self, keep: int = 4, seed: int | None = None):
        self.keep, self.seed = keep, seed

    def stages(self, info):
        return [Stage("input", self.keep)]

    def select(self, ctx):
        return torch.arange(self.keep).expand(ctx.visual_hidden.shape[0], -1)

class Needy(Tiny):
    """Needs a required argument."""

    def __init__(self, alpha: float, keep: int = 4):
        super().__init__(keep)
        self.alpha = alpha

NOT_A_SELECTOR = object()
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """``fake(dist, entry_points, modules)`` writes an importable fake distribution and rescans."""
    created: list[str] = []

    def make(dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None,
             group: str = "fvlm.selectors", version: str = "1.0"):
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for mod, src in (modules or {}).items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
            created.append(mod)
        registry.clear_cache()

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for mod in created:
        sys.modules.pop(mod, None)
    registry.clear_cache()


@pytest.fixture(autouse=True)
def _fresh_registry():
    registry.clear_cache()
    yield
    registry.clear_cache()


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")


def test_builtins_and_plugin_listed():
    names = registry.list_selectors()
    assert {"keep_all", "random", "uniform", "example_norm"} <= set(names)
    assert names == sorted(names)
    assert {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"} <= set(registry.list_adapters())


def test_glob_patterns(fake):
    fake("fake-glob", {"uni_a": "m:A", "uni_b": "m:B", "other": "m:C"})
    assert registry.list_selectors("uni_*") == ["uni_a", "uni_b"]
    assert "other" not in registry.list_selectors("*_?")
    assert registry.list_selectors("nothing*") == []
    assert registry.list_adapters("llava*") == ["llava", "llava_next", "llava_onevision"]


def test_listing_imports_nothing(fake):
    fake("fake-lazy", {"lazy": "fvlm_fake_lazy:Tiny"}, {"fvlm_fake_lazy": TINY})
    assert "lazy" in registry.list_selectors()
    registry.SELECTORS.registrations("lazy")
    registry.SELECTORS.conflicts()
    assert "fvlm_fake_lazy" not in sys.modules
    assert registry.get_selector_class("lazy").__name__ == "Tiny"
    assert "fvlm_fake_lazy" in sys.modules


def test_create_and_info(fake):
    fake("fake-ok", {"tiny": "fvlm_fake_ok:Tiny"}, {"fvlm_fake_ok": TINY}, version="2.3")
    sel = registry.create_selector("tiny", keep=2, seed=None)  # None kwargs are dropped
    assert isinstance(sel, TokenSelector) and (sel.keep, sel.seed) == (2, None)
    assert sel.stages(None) == [Stage("input", 2)]
    info = registry.selector_info("tiny")
    assert info.cls is type(sel) and info.needs == frozenset()
    assert (info.distribution, info.version, info.summary) == ("fake-ok", "2.3", "A tiny test selector.")
    assert info.parameters == {"keep": ("int", 4), "seed": ("int | None", None)}


def test_broken_plugin_isolated(fake):
    fake("fake-good", {"good": "fvlm_fake_good:Tiny"}, {"fvlm_fake_good": TINY})
    fake("fake-bad", {"bad": "fvlm_fake_bad:Tiny"}, {"fvlm_fake_bad": "raise ImportError('boom: no gpu lib')\n"})
    assert {"good", "bad"} <= set(registry.list_selectors())
    broken = registry.SELECTORS.broken()
    assert "good" not in broken and "example_norm" not in broken
    assert "bad" in broken and "fake-bad" in broken["bad"] and "boom" in broken["bad"]
    assert registry.create_selector("good", keep=1).keep == 1
    with pytest.raises(PluginLoadError, match="bad") as exc:
        registry.create_selector("bad")
    err = exc.value
    assert (err.entry_point, err.distribution) == ("bad", "fake-bad")
    assert "fake-bad 1.0" in str(err) and "boom: no gpu lib" in str(err)
    assert isinstance(err.__cause__, ImportError) and isinstance(err, FVLMError)


def test_wrong_object_is_a_load_error(fake):
    fake("fake-wrong", {"notsel": "fvlm_fake_wrong:NOT_A_SELECTOR", "abstract": "fvlm.selectors.base:ScoreSelector"},
         {"fvlm_fake_wrong": TINY})
    with pytest.raises(PluginLoadError, match="not a subclass of fvlm.selectors.base.TokenSelector"):
        registry.get_selector_class("notsel")
    with pytest.raises(PluginLoadError, match="abstract"):
        registry.get_selector_class("abstract")


def test_duplicate_name_names_both(fake):
    fake("fake-one", {"dup": "fvlm_fake_dup:Tiny"}, {"fvlm_fake_dup": TINY})
    fake("fake-two", {"dup": "fvlm_fake_dup:Needy"}, version="2.0")
    assert registry.list_selectors("dup") == ["dup"]  # listed once, raising only on lookup
    assert sorted(registry.SELECTORS.conflicts()["dup"]) == ["fake-one 1.0", "fake-two 2.0"]
    for lookup in (registry.create_selector, registry.selector_info, registry.get_selector_class):
        with pytest.raises(DuplicateNameError, match="fake-one 1.0") as exc:
            lookup("dup")
        assert "fake-two 2.0" in str(exc.value)
    assert "dup" not in registry.SELECTORS.broken()


def test_unknown_name_suggests():
    with pytest.raises(UnknownSelectorError, match="Did you mean 'uniform'") as exc:
        registry.create_selector("unifrom")
    assert isinstance(exc.value, KeyError) and str(exc.value).startswith("unknown selector 'unifrom'")
    with pytest.raises(UnknownAdapterError, match="qwen2_vl") as exc:
        registry.get_adapter_class("qwen2vl")
    assert isinstance(exc.value, UnsupportedModelError)


def test_bad_kwargs(fake):
    fake("fake-kw", {"tiny": "fvlm_fake_kw:Tiny", "needy": "fvlm_fake_kw:Needy"}, {"fvlm_fake_kw": TINY})
    with pytest.raises(InvalidParameterError, match="'kep'") as exc:
        registry.create_selector("tiny", kep=3)
    msg = str(exc.value)
    assert "tiny" in msg and "did you mean 'keep'" in msg and "keep, seed" in msg
    assert isinstance(exc.value, TypeError)
    with pytest.raises(InvalidParameterError, match="missing required parameter.*alpha"):
        registry.create_selector("needy", alpha=None)  # None is dropped, so alpha is missing
    assert registry.create_selector("needy", alpha=0.5).alpha == 0.5


def test_example_plugin_selector():
    torch = pytest.importorskip("torch")
    sel = registry.create_selector("example_norm", keep=3, layer=2)
    assert sel.stages(None) == [Stage(2, 3)]
    hidden = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]])
    ctx = type("Ctx", (), {"visual_hidden": hidden})()
    assert torch.allclose(sel.score(ctx), torch.tensor([[5.0, 1.0, 10.0]]))
    info = registry.selector_info("example_norm")
    assert info.distribution == "fvlm-example-selector" and info.needs == frozenset()


def test_cli_list_marks_broken_and_conflicts(fake, wide, capsys):
    fake("fake-good", {"good": "fvlm_fake_cli:Tiny"}, {"fvlm_fake_cli": TINY})
    fake("fake-bad", {"bad": "fvlm_fake_cli_bad:Tiny"}, {"fvlm_fake_cli_bad": "raise ImportError('boom')\n"})
    fake("fake-dup1", {"dup": "fvlm_fake_cli:Tiny"})
    fake("fake-dup2", {"dup": "fvlm_fake_cli:Tiny"})
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert {"good", "bad", "dup", "example_norm", "keep_all", "random", "uniform"} <= set(lines)
    assert "ok" in lines["good"] and "fake-good 1.0" in lines["good"]
    assert "BROKEN" in lines["bad"] and "boom" in lines["bad"]
    assert "CONFLICT" in lines["dup"] and "fake-dup1 1.0" in lines["dup"] and "fake-dup2 1.0" in lines["dup"]
    assert main(["list", "go*"]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "bad" not in out


def test_cli_info_and_errors(fake, wide, capsys):
    fake("fake-info", {"tiny": "fvlm_fake_info:Tiny"}, {"fvlm_fake_info": TINY})
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "fvlm_fake_info.Tiny" in out and "A tiny test selector." in out and "fake-info 1.0" in out
    assert "keep" in out and "seed" in out
    assert main(["info", "tinyy"]) == 2  # an unknown name is a usage error
    assert "Did you mean 'tiny'" in capsys.readouterr().err
    assert main(["list", "--adapters"]) == 0
    assert "qwen2_5_vl" in capsys.readouterr().out
