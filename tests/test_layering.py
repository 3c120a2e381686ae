"""The package's layering holds: no stage imports another stage, models/ imports nothing
from methods/, artifact/ imports nothing above the ground floor, and there is no import cycle
(scripts/import_graph.py checks the source)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


def test_no_layering_violation() -> None:
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    assert spec is not None and spec.loader is not None
    graph_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_mod)
    graph = graph_mod.graph()
    assert "wasi_tool.training.loop" in graph and "wasi_tool.stages.finetune" in graph
    assert graph_mod.violations(graph) == []
    # the checker itself sees a planted back-arrow and a cycle
    planted = {**graph, "wasi_tool.models.loading": {"wasi_tool.methods.bsr"}}
    planted["wasi_tool.methods.bsr"] = {*graph["wasi_tool.methods.bsr"], "wasi_tool.models.loading"}
    found = graph_mod.violations(planted)
    assert any(v.startswith("models imports methods") for v in found)
    assert any(v.startswith("import cycle") for v in found)
    # and an artifact module that reaches up a floor
    up = {**graph, "wasi_tool.artifact.io": {"wasi_tool.models.loading"}}
    assert any(v.startswith("artifact imports a higher floor") for v in graph_mod.violations(up))
