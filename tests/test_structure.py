"""The package's import graph stays layered: no cycles, no upward imports, no test fixtures in production."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "imports.py"


@pytest.fixture(scope="module")
def imports():
    spec = importlib.util.spec_from_file_location("fvlm_imports_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graph(imports):
    return imports.build()


def test_the_graph_reads_real_edges(graph):
    assert "fvlm.types" in graph.edges["fvlm.session"]
    assert "fvlm.selectors.algorithms" in graph.edges["fvlm.selectors.base"]
    assert "fvlm.context" not in graph.edges["fvlm.selectors.base"]  # under TYPE_CHECKING only
    assert "fvlm.commands.run" in graph.local["fvlm.cli"]  # deferred: the CLI starts fast


def test_no_import_cycles(imports, graph):
    assert imports.cycles(graph.edges) == []


def test_the_cycle_finder_finds_cycles(imports):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert imports.cycles(edges) == [["a", "b", "c"]]


def test_no_upward_imports(imports, graph):
    assert imports.upward(graph) == []
    assert imports.upward_local(graph) == []
    assert imports.layer("fvlm.selectors.fastv") > imports.layer("fvlm.metrics.flops") > imports.layer("fvlm.adapters")


def test_no_production_module_imports_test_fixtures(imports, graph):
    assert imports.fixture_imports(graph) == []


def test_every_module_has_a_layer(imports, graph):
    top = {m for m in graph.edges if imports.layer(m) == len(imports.LAYERS) - 1}
    assert top <= {"fvlm", "fvlm.cli", "fvlm.commands", "fvlm.integrations"} | {
        m for m in top if m.startswith(("fvlm.commands.", "fvlm.integrations."))}
