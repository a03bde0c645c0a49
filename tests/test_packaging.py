"""The declared dependency ranges are the ones CI tests: every lower bound is what the "min" leg
installs (constraints/ci-min.txt), and the "latest" leg (constraints/ci-latest.txt) is in range."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _legs() -> dict[str, list[str]]:
    """Each CI leg's fvlm extras, as .ci/run's LEGS array lists them."""
    text = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"^LEGS=\((.*?)^\)", text, re.S | re.M).group(1)
    return {name: extras.split(",") for name, extras in re.findall(r'^\s*"(\S+)\s+([^\s"]+)', block, re.M)}


def _requirements(leg: str | None = None) -> list[Requirement]:
    """What a leg installs from pyproject.toml (its extras); every extra when ``leg`` is None."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    extras = project["optional-dependencies"]
    for extra in (_legs()[leg] if leg else extras):
        declared += extras[extra]
    return [Requirement(r) for r in declared]


def _pins(leg: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints" / f"ci-{leg}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"ci-{leg}.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_has_a_lower_bound_the_min_leg_installs():
    """The lmms extra's bounds are what its own leg installs (lmms-eval needs torchvision: not in min)."""
    pins, lmms = _pins("min"), _pins("lmms")
    main = {canonicalize_name(r.name) for r in _requirements("min")}
    for req in _requirements():
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(floors) == 1, f"{req}: declare one lower bound (>=) that CI tests"
        leg, installed = ("min", pins) if canonicalize_name(req.name) in main else ("lmms", lmms)
        installed = installed.get(canonicalize_name(req.name))
        assert installed == floors[0], f"{req}: the {leg} leg installs {installed}, not the lower bound {floors[0]}"


def test_the_legs_are_the_ones_ci_runs():
    assert _legs() == {"min": ["test", "docs", "plot"], "latest": ["test", "docs", "plot"], "lmms": ["test", "lmms"]}


@pytest.mark.parametrize("leg", ["min", "latest", "lmms"])
def test_each_leg_is_in_the_declared_ranges(leg):
    pins = _pins(leg)
    for req in _requirements(leg):
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"constraints/ci-{leg}.txt does not pin {req.name}"
        assert req.specifier.contains(version, prereleases=True), f"ci-{leg}.txt: {req.name} {version} not in {req}"


def test_the_latest_leg_is_not_older_than_the_min_leg():
    low, high = _pins("min"), _pins("latest")
    older = {name: (low[name], high[name]) for name in low.keys() & high.keys() if high[name] < low[name]}
    assert not older, f"ci-latest.txt pins releases older than ci-min.txt: {older}"
