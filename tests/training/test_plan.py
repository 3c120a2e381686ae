"""The memory planner: sizes parse, an impossible budget is one line and exit 1, a possible one
picks a memory mode and records its prediction beside the measured peak."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.stages import FinetuneConfig
from wasi_tool.training.plan import parse_size

TINY = ["--random-init", "--arch", "vit_tiny_patch16_224", "--img-size", "32"]


def test_parse_size() -> None:
    assert parse_size("1.2GB") == 1_200_000_000
    assert parse_size("800MB") == 800_000_000 and parse_size("1.5G") == 1_500_000_000
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(WasiToolError):
            parse_size(bad)
    with pytest.raises(WasiToolError, match="not both"):
        FinetuneConfig(memory_budget="1GB", memory_mode="block")


@pytest.mark.slow
def test_impossible_budget_is_one_line_and_exit_1(tmp_path: Path) -> None:
    args = ["finetune", *TINY, "--method", "wasi", "--epochs", "1", "--max-steps", "2"]
    result = CliRunner().invoke(
        app, [*args, "--memory-budget", "10MB", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    assert (
        "cannot be met (plans fit 95% of it on glibc): the least this run can reach is"
        in (lines[0])
    )
    assert "library floor" in lines[0] and "so the least budget it plans for is" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_budget_plans_and_records_prediction(tmp_path: Path) -> None:
    from wasi_tool.models import ModelSource
    from wasi_tool.stages import run_finetune

    src = ModelSource(random_init=True, arch="vit_tiny_patch16_224", img_size=32)
    cfg = FinetuneConfig(method="wasi", epochs=1, max_steps=2, batch_size=16, memory_budget="50GB")
    metrics = run_finetune(src, "digits", cfg, tmp_path / "run").metrics
    plan = metrics.memory_plan
    assert plan is not None and plan["memory_mode"] == "off"  # the least recompute that fits
    assert [c["memory_mode"] for c in plan["candidates"]] == ["off", "attn", "mlp", "block"]
    saved = [c["saved_activations"] for c in plan["candidates"]]
    assert saved[-1] < saved[0]  # block recompute keeps the least
    assert plan["measured_peak_bytes"] == metrics.measured.peak_rss_bytes
    assert 0.5 < plan["measured_over_predicted"] < 1.5


def test_the_margin_follows_the_allocator(
    tiny_model, images, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A budget whose 95% holds the plan but whose 86% does not: met on glibc, refused on
    tcmalloc (it keeps freed memory resident beyond the live tensors the plan counts)."""
    import torch

    from wasi_tool.training import plan as planner
    from wasi_tool.training.prepare import prepare_for_training

    monkeypatch.setattr(planner, "peak_rss_bytes", lambda: 0)  # the step alone decides
    assert planner.margin("glibc") == planner.MARGIN == 0.05
    assert planner.margin("tcmalloc") == 0.14 and planner.margin("jemalloc") == 0.06
    model = tiny_model()
    cfg = FinetuneConfig(method="wasi", act_ranks=[4, 3, 16], targets="mlp", memory_budget="1GB")
    prepare_for_training(model, cfg, lambda t: ({n: (4, 3, 16) for n in t}, None))
    x, y = images(16), torch.arange(16) % 10
    block = planner.plan_memory(model, x, y, 10**12, floor=0, modes=("block",)).chosen
    budget = int(block.peak / 0.9)  # 0.95 of it holds the plan, 0.86 does not
    monkeypatch.setattr(planner, "in_use", lambda: "glibc")
    assert planner.plan_memory(model, x, y, budget, floor=0, modes=("block",)).chosen.peak <= budget
    monkeypatch.setattr(planner, "in_use", lambda: "tcmalloc")
    with pytest.raises(WasiToolError, match=r"plans fit 86% of it on tcmalloc"):
        planner.plan_memory(model, x, y, budget, floor=0, modes=("block",))


def test_allowed_lossy_storage_is_tried_after_each_exact_mode(
    tiny_model, images, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import torch

    from wasi_tool.nn.lossy import stored_lossily
    from wasi_tool.nn.recompute import recomputed
    from wasi_tool.training import plan as planner
    from wasi_tool.training.prepare import prepare_for_training

    monkeypatch.setattr(planner, "peak_rss_bytes", lambda: 0)  # the step alone decides
    model = tiny_model()
    cfg = FinetuneConfig(
        method="wasi", act_ranks=[4, 3, 16], targets="mlp", lossy="bf16", memory_budget="1000GB"
    )
    prepare_for_training(model, cfg, lambda t: ({n: (4, 3, 16) for n in t}, None))
    assert not stored_lossily(model)  # with a budget, the plan decides
    x, y = images(16), torch.arange(16) % 10
    plan = planner.plan_memory(model, x, y, 10**12, floor=0, lossy="bf16")
    labels = [c.label for c in plan.candidates]
    assert labels == ["off", "off + bf16", "attn", "attn + bf16", "mlp", "mlp + bf16", "block"]
    by = {c.label: c for c in plan.candidates}
    assert by["off + bf16"].saved_activations < by["off"].saved_activations
    assert plan.chosen.label == "off" and not stored_lossily(model)
    # each candidate's probe step is timed, and the table shows it beside memory and error
    assert plan.probe_batch == 4 and all(c.probe_seconds > 0 for c in plan.candidates)
    table = planner.plan_table(plan).splitlines()
    assert [r.split("  ")[0] for r in table[-2:]] == ["gradient error", "probe step (batch 4)"]
    assert table[-1].count(" ms (") == len(plan.candidates) and "(1.00x)" in table[-1]
    # a budget between the two: exact off does not fit, off + bf16 does
    budget = (by["off"].peak + by["off + bf16"].peak) / 2 / (1 - planner.MARGIN)
    plan = planner.plan_memory(model, x, y, int(budget), floor=0, lossy="bf16")
    assert plan.chosen.label == "off + bf16"
    assert stored_lossily(model) and not recomputed(model)
    assert plan.to_dict()["lossy"] == "bf16"


def test_activation_ranks_are_planned_only_when_no_exact_plan_fits(
    images, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Under block recompute a WASI layer still keeps its compressed input from forward to
    backward. With high calibrated ranks that is most of what a step keeps: a budget below it
    is met by lowering the ranks (the gradient-error DP picks them for the room left), and the
    plan's prediction with the planned ranks is re-probed, not assumed."""
    import torch

    from wasi_tool.models.registry import build_model
    from wasi_tool.nn.recompute import recomputed
    from wasi_tool.nn.subspace import WASILinear
    from wasi_tool.training import plan as planner
    from wasi_tool.training.prepare import prepare_for_training

    monkeypatch.setattr(planner, "peak_rss_bytes", lambda: 0)  # the step alone decides
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2)
    high = (16, 17, 192)  # every mode at full rank: the most a layer can keep
    cfg = FinetuneConfig(method="wasi", act_ranks=list(high), targets="mlp", memory_budget="1GB")
    prepare_for_training(model, cfg, lambda t: ({n: high for n in t}, None))
    x, y = images(16), torch.arange(16) % 10
    layers = [m for m in model.modules() if isinstance(m, WASILinear)]

    roomy = planner.plan_memory(model, x, y, 10**12, floor=0, modes=("block",), plan_ranks=True)
    assert roomy.chosen.act_ranks is None  # it fits: the calibrated ranks stay
    block = roomy.chosen
    assert block.saved_in_targets > block.saved_activations / 2  # the targets dominate
    # an eighth of the targets' bytes below block's peak (lower ranks free less than they
    # save: the backward's transient rises as the saved bytes fall)
    budget = int((block.peak - block.saved_in_targets / 8) / (1 - planner.MARGIN))
    with pytest.raises(WasiToolError, match="cannot be met"):  # ranks are not the plan's
        planner.plan_memory(model, x, y, budget, floor=0, modes=("block",))
    assert all(m.act.ranks == high for m in layers)  # a refused plan leaves them as they were

    plan = planner.plan_memory(model, x, y, budget, floor=0, modes=("block",), plan_ranks=True)
    chosen = plan.chosen
    assert chosen.label == "block, planned act ranks" and chosen.peak <= budget
    assert chosen.saved_in_targets < block.saved_in_targets * 7 / 8
    assert [c.label for c in plan.candidates] == ["block", "block, planned act ranks"]
    assert chosen.act_ranks is not None and recomputed(model)
    ranks = [tuple(m.act.ranks) for m in layers]
    assert ranks == [tuple(r) for r in chosen.act_ranks.values()]
    assert all(r != high and all(a <= b for a, b in zip(r, high, strict=True)) for r in ranks)
    assert plan.to_dict()["act_ranks_planned"] is True
    model(x).sum().backward()  # the planned ranks train


def test_the_probes_leave_the_random_stream_as_it_was(images) -> None:  # type: ignore[no-untyped-def]
    """A model with dropout: the probe steps draw masks, and the stream is restored after, so a
    run planned under a budget that chose vanilla trains exactly as vanilla (MiniLM's auto rows
    differed from vanilla's before)."""
    import timm
    import torch

    from wasi_tool.training import plan as planner

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2, drop_rate=0.5
    )
    x, y = images(8), torch.arange(8) % 10
    rng = torch.random.get_rng_state()
    planner.plan_memory(model, x, y, 10**12, floor=0, modes=("off",))
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_the_planners_own_probing_holds_no_more_than_its_probe_steps(images) -> None:  # type: ignore[no-untyped-def]
    """The gradient-error probe runs with the model's recompute regions active and takes each
    layer's error as its gradient arrives: it holds no more live memory than a probe step of
    the same batch (it held the whole graph and every output gradient before: the plan's own
    peak went above the step it predicted). And probes leave no gradient behind: a WASI
    layer's pending factors grew by each probe, so a second plan predicted a larger step."""
    import torch

    from wasi_tool.measure import LiveTensorMeter
    from wasi_tool.models.registry import build_model
    from wasi_tool.nn.subspace import WASILinear
    from wasi_tool.training import plan as planner
    from wasi_tool.training.prepare import prepare_for_training

    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=4)
    ranks = (8, 17, 96)
    cfg = FinetuneConfig(method="wasi", act_ranks=list(ranks), targets="all", memory_budget="1GB")
    prepare_for_training(model, cfg, lambda t: ({n: ranks for n in t}, None))
    x, y = images(32), torch.arange(32) % 10
    probe_live: list[int] = []
    error_live: list[int] = []
    probe, error = planner._probe, planner.plan_gradient_error

    layers = [m for m in model.modules() if isinstance(m, WASILinear)]
    pending_before: list[bool] = []

    def metered_probe(*args, **kwargs):  # type: ignore[no-untyped-def]
        pending_before.append(any(m.sink.p is not None for m in layers))
        found = probe(*args, **kwargs)
        probe_live.append(found[1])
        return found

    def metered_error(*args, **kwargs):  # type: ignore[no-untyped-def]
        with LiveTensorMeter() as live:
            found = error(*args, **kwargs)
        error_live.append(live.peak)
        return found

    mp = pytest.MonkeyPatch()
    mp.setattr(planner, "_probe", metered_probe)
    mp.setattr(planner, "plan_gradient_error", metered_error)
    try:
        first = planner.plan_memory(model, x, y, 10**12, floor=0, modes=("block",))
        second = planner.plan_memory(model, x, y, 10**12, floor=0, modes=("block",))
    finally:
        mp.undo()
    assert len(probe_live) == 4 and len(error_live) == 2  # the error is computed once a plan
    larger = max(probe_live[1], probe_live[3])  # the larger probe batch, which the error uses
    assert error_live[0] <= 1.3 * larger, (error_live, probe_live)  # ~1.0x at ViT-B/32
    assert first.chosen.gradient_error > 0
    # each probe starts with no pending gradient: the larger probe does not carry the
    # smaller one's factors (main before this: 12.8 vs 6.1 MB live, a 26x larger transient)
    assert pending_before == [False] * 4
    assert probe_live[1] <= 1.25 * probe_live[0]
    assert second.chosen.transient == pytest.approx(first.chosen.transient, rel=0.02)
