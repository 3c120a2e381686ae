"""method="auto": under a memory budget, the most exact method whose plan fits (vanilla, then
wsi, then wasi), with the choice, what was tried and why recorded in the plan; each plan
carries the relative weight-gradient error of what it compresses (0 for exact plans)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource
from wasi_tool.stages import FinetuneConfig
from wasi_tool.training import plan as planner
from wasi_tool.training import session as sessions
from wasi_tool.training.plan import BudgetNotMet
from wasi_tool.training.session import build_session

SRC = ModelSource(
    random_init=True,
    arch="vit_tiny_patch16_224",
    img_size=32,
    model_kwargs={"depth": 2, "patch_size": 4},
)


@pytest.fixture
def steady(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step alone decides: no process peak so far, no library floor (both are the same for
    every candidate of one run; here they would differ between the test's sessions)."""
    monkeypatch.setattr(planner, "peak_rss_bytes", lambda: 0)
    monkeypatch.setattr(sessions, "library_floor", lambda model: 0)


def _cfg(method: str, budget: int | str, **kw: Any) -> FinetuneConfig:
    return FinetuneConfig(
        method=method, targets="mlp", batch_size=32, memory_budget=str(budget), **kw
    )


def _peaks(method: str) -> dict[str, int]:
    plan = build_session(SRC, "digits", _cfg(method, 10**13)).plan
    assert plan is not None
    return {c.label: c.peak for c in plan.candidates}


def test_auto_needs_a_budget() -> None:
    with pytest.raises(WasiToolError, match="method auto chooses the method that fits a memory"):
        FinetuneConfig(method="auto")
    with pytest.raises(WasiToolError, match="momentum"):  # the wsi/wasi candidates' checks
        FinetuneConfig(method="auto", memory_budget="1GB", momentum=0.9)


def test_a_roomy_budget_trains_the_model_as_it_is(steady: None) -> None:
    session = build_session(SRC, "digits", _cfg("auto", 10**13))
    assert session.config.method == "vanilla" and session.method.name == "vanilla"
    plan = session.plan
    assert plan is not None and plan.chosen.memory_mode == "off"
    assert plan.chosen.gradient_error == 0.0
    record = plan.to_dict()
    assert record["method"] == "vanilla" and record["gradient_error"] == 0.0
    assert record["auto"]["tried"] == [{"method": "vanilla", "fits": True, "memory_mode": "off"}]
    assert "gradients exact" in record["auto"]["why"]


def test_the_exact_plan_is_preferred_when_a_compressed_one_also_fits(steady: None) -> None:
    vanilla, wasi = _peaks("vanilla"), _peaks("wasi")
    # a budget that vanilla meets only by recomputing, and wasi meets without recompute
    need = max(vanilla["block"], wasi["off"])
    assert need < vanilla["off"], (vanilla, wasi)
    budget = int(need / (1 - planner.MARGIN)) + 1
    assert budget * (1 - planner.MARGIN) < vanilla["off"]
    compressed = build_session(SRC, "digits", _cfg("wasi", budget))
    assert compressed.plan is not None and compressed.plan.chosen.memory_mode == "off"
    assert compressed.plan.chosen.gradient_error > 0  # its activations are compressed

    session = build_session(SRC, "digits", _cfg("auto", budget))
    assert session.config.method == "vanilla"
    assert session.plan is not None and session.plan.chosen.memory_mode != "off"
    assert session.plan.chosen.gradient_error == 0.0
    assert session.plan.chosen.peak <= budget


def test_the_next_method_is_tried_on_the_model_as_loaded(
    steady: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When vanilla and wsi cannot meet the budget, wasi gets a freshly loaded model with the
    same new head (the seed is reset), and the reason gives its gradient error."""
    real = sessions.prepare_session
    heads: list[torch.Tensor] = []

    def refuse_exact(model: Any, config: FinetuneConfig, *a: Any, **k: Any) -> Any:
        heads.append(model.head.weight.detach().clone())
        if config.method in ("vanilla", "wsi"):
            raise BudgetNotMet(f"{config.method} needs more")
        return real(model, config, *a, **k)

    monkeypatch.setattr(sessions, "prepare_session", refuse_exact)
    session = build_session(SRC, "digits", _cfg("auto", 10**13))
    assert session.config.method == "wasi" and len(heads) == 3
    for head in heads[1:]:
        torch.testing.assert_close(head, heads[0], rtol=0, atol=0)
    assert session.plan is not None and session.plan.auto is not None
    tried = session.plan.auto["tried"]
    assert [t["method"] for t in tried] == ["vanilla", "wsi", "wasi"]
    assert [t["fits"] for t in tried] == [False, False, True]
    error = session.plan.chosen.gradient_error
    assert 0 < error < 1
    assert f"relative weight-gradient error {error:.3f}" in session.plan.auto["why"]
    assert session.plan.auto["why"].startswith("vanilla and wsi did not fit")


def test_no_method_fits_is_one_error(steady: None) -> None:
    with pytest.raises(WasiToolError, match=r"cannot be met by any method \(vanilla, wsi, wasi\)"):
        build_session(SRC, "digits", _cfg("auto", "1MB"))


def test_gradient_error_is_the_fidelity_measure(tiny_model, images) -> None:  # type: ignore[no-untyped-def]
    """At full ranks nothing is lost (error 0 up to rounding); at rank 1 everywhere it is large;
    lower ranks never lose less on this batch (the truncated HOSVD is nested)."""
    from wasi_tool.models.targets import select_targets

    model = tiny_model()
    x, y = images(8), torch.arange(8) % 10
    names = select_targets(model, "mlp")[:2]
    full = {n: [8, 65, model.get_submodule(n).in_features] for n in names}
    assert planner.plan_gradient_error(model, x, y, full, batch=8) < 1e-6
    errors = [
        planner.plan_gradient_error(model, x, y, {n: [r, r, r] for n in names}, batch=8)
        for r in (1, 4, 8)
    ]
    assert errors[0] > 0.3 and errors[0] >= errors[1] >= errors[2] > 0
