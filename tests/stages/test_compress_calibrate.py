"""compress with calibration (method.md section 8) and a rank budget, through compress_ and the
stage: full rank is exact, calibrated beats plain on held-out inputs, the budget holds, and
the artifact says how it was made."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.calibrate import calibrate_grams
from wasi_tool.models import ModelSource, load_model
from wasi_tool.models.targets import select_targets
from wasi_tool.nn import FactoredLinear
from wasi_tool.ops import dropped_energy, whitening
from wasi_tool.ops.whiten import whitened_spectrum
from wasi_tool.stages import CompressConfig, compress_, run_compress
from wasi_tool.transforms.compress import parse_calibration


def _grams(
    model: nn.Module, names: list[str], images: Callable[..., torch.Tensor], seed: int
) -> dict[str, Any]:
    """Grams over 256 images (1280 rows: more than any target's inputs have dimensions, so the
    held-out comparison is of the metric, not of an under-determined fit)."""
    return calibrate_grams(model, names, (images(64, 32, seed + k) for k in range(4)))


def test_full_rank_calibrated_logits_equal_original(
    tiny: nn.Module, images: Callable[..., torch.Tensor]
) -> None:
    x = images(2, 32)
    with torch.no_grad():
        reference = tiny.eval()(x)
    names = select_targets(tiny, "all", [])
    grams = _grams(tiny, names, images, 10)
    report = compress_(tiny, CompressConfig(targets="all", eps=1.0, force=True), grams)
    assert all(r.calibrated and r.rank == r.full_rank for r in report.layers)
    with torch.no_grad():
        torch.testing.assert_close(tiny.eval()(x), reference, rtol=1e-4, atol=1e-4)


def test_calibrated_layers_keep_orthonormal_l_and_beat_plain_on_held_out(
    tiny: nn.Module, images: Callable[..., torch.Tensor]
) -> None:
    names = select_targets(tiny, "mlp", [])
    grams, held = _grams(tiny, names, images, 10), _grams(tiny, names, images, 50)
    report = compress_(tiny, CompressConfig(eps=0.8), grams, held)
    for r in report.layers:
        assert r.heldout_calibrated is not None and r.heldout_plain is not None
        assert r.heldout_calibrated <= r.heldout_plain, r
        layer = tiny.get_submodule(r.name)
        assert isinstance(layer, FactoredLinear) and layer.rank == r.rank
        eye = torch.eye(layer.rank)
        torch.testing.assert_close(layer.L.T @ layer.L, eye, rtol=1e-4, atol=1e-4)
    totals = report.totals()
    assert totals["median_heldout_calibrated"] < totals["median_heldout_plain"]


def test_eps_reads_the_weight_spectrum_by_default_and_the_output_one_when_asked(
    tiny_model: Callable[..., nn.Module], images: Callable[..., torch.Tensor]
) -> None:
    """Default: calibrated ranks are plain SVD's at the same eps (same parameters), each layer
    losing less held-out output. "output": eps is a share of the whitened (output) energy,
    so it keeps exactly that share on the calibration data and picks no higher ranks."""
    plain_model, weight_model, output_model = tiny_model(), tiny_model(), tiny_model()
    names = select_targets(plain_model, "mlp", [])
    grams, held = _grams(plain_model, names, images, 10), _grams(plain_model, names, images, 50)
    plain = compress_(plain_model, CompressConfig(eps=0.8))
    by_weight = compress_(weight_model, CompressConfig(eps=0.8), grams, held)
    by_output = compress_(output_model, CompressConfig(eps=0.8, eps_spectrum="output"), grams, held)
    assert [r.rank for r in by_weight.layers] == [r.rank for r in plain.layers]
    for w, o in zip(by_weight.layers, by_output.layers, strict=True):
        assert w.heldout_calibrated is not None and w.heldout_plain is not None
        assert w.heldout_calibrated < w.heldout_plain, w  # (random weights: not by half)
        assert o.rank <= w.rank and o.energy >= 0.8 - 1e-9  # the output energy it keeps
    assert sum(o.rank for o in by_output.layers) < sum(w.rank for w in by_weight.layers)
    with pytest.raises(WasiToolError, match="eps_spectrum must be one of weight, output"):
        CompressConfig(eps=0.8, eps_spectrum="input")


def test_calibrate_without_grams_or_with_missing_ones_is_an_error(tiny: nn.Module) -> None:
    with pytest.raises(WasiToolError, match="Gram"):
        compress_(tiny, CompressConfig(calibrate="digits:16"))
    with pytest.raises(WasiToolError, match="no calibration Gram matrix"):
        compress_(tiny, CompressConfig(), {"blocks.0.mlp.fc1": torch.eye(192)})


def test_rank_budget_is_met_and_beats_uniform_eps(
    tiny: nn.Module, tiny_model: Callable[..., nn.Module], images: Callable[..., torch.Tensor]
) -> None:
    names = select_targets(tiny, "mlp", [])
    grams, held = _grams(tiny, names, images, 10), _grams(tiny, names, images, 50)
    report = compress_(tiny, CompressConfig(rank_budget=0.05), grams, held)
    b = report.budget
    assert b is not None and b["used_params"] <= b["allowed_params"]
    assert b["allowed_params"] == int(
        0.05 * sum(r.out_features * r.in_features for r in report.layers)
    )
    used = sum(r.rank * (r.out_features + r.in_features) for r in report.layers)
    assert used == b["used_params"]
    # maximal: no layer could take one more rank within the budget
    smallest = min(r.out_features + r.in_features for r in report.layers)
    assert b["allowed_params"] - used < smallest
    # the same parameters spent evenly (the same rank everywhere) lose more output energy
    reference = tiny_model()  # the weights ``tiny`` had before compress_
    values = {
        n: whitened_spectrum(reference.get_submodule(n).weight, whitening(grams[n].matrix)).s
        for n in names
    }
    even_rank = b["allowed_params"] // sum(r.out_features + r.in_features for r in report.layers)
    even = {n: even_rank for n in names}
    assert sum(even_rank * (r.out_features + r.in_features) for r in report.layers) <= used
    chosen = {r.name: r.rank for r in report.layers}
    assert dropped_energy(values, chosen) < dropped_energy(values, even)


def test_config_checks() -> None:
    assert parse_calibration("digits") == ("digits", 256)
    assert parse_calibration("digits:64") == ("digits", 64)
    assert parse_calibration("emoji-lang:300:128") == ("emoji-lang:300", 128)
    assert parse_calibration("emoji-translate:500:de,fr") == ("emoji-translate:500:de,fr", 256)
    for bad, match in (
        ({"calibrate": "digits:0"}, "N >= 1"),
        ({"calibrate": ":5"}, "data source"),
        ({"rank_budget": 0.0}, "rank_budget"),
        ({"rank_budget": 1.5}, "rank_budget"),
        ({"rank_budget": 0.5, "eps": 0.5}, "not both"),
        ({"calibrate_damp": -1.0}, "damping"),
        ({"calibrate_seed": -1}, "calibrate_seed"),
    ):
        with pytest.raises(WasiToolError, match=match):
            CompressConfig(**bad)
    cfg = CompressConfig(calibrate="digits:32", rank_budget=0.3)
    assert cfg.eps is None and CompressConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
def test_stage_end_to_end_records_the_calibration(
    tmp_path: Path, tiny_spec: Mapping[str, Any]
) -> None:
    source = ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32, num_classes=10)
    config = CompressConfig(calibrate="digits:48", rank_budget=0.1)
    out = tmp_path / "cal"
    result = run_compress(source, config, out)
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["stages"][-1]
    assert stage["calibration"]["data"] == "digits" and stage["calibration"]["samples"] == 48
    assert stage["calibration"]["seed"] == 233 and stage["calibration"]["damp"] == 1e-3
    assert stage["calibration"]["held_out"]["split"] == "test"
    assert stage["budget"]["used_params"] <= stage["budget"]["allowed_params"]
    assert stage["config"]["rank_budget"] == 0.1
    for row in manifest["layers"]:
        err = row["heldout_error"]
        assert err["calibrated"] <= err["plain"]
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["rows"] == 48 * 5  # 4 patches + CLS token per image
    # the artifact loads back to the same function
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = result.loaded.model.eval()(x)
        after = load_model(ModelSource(checkpoint=out)).model.eval()(x)
    torch.testing.assert_close(after, before)


@pytest.mark.slow
def test_causal_lm_calibration_leaves_out_right_padding(tmp_path: Path) -> None:
    from tests.models.llm_fixtures import save_llama_lm
    from wasi_tool.data.lm import load_lm_data
    from wasi_tool.models import hf
    from wasi_tool.training.loss import IGNORE

    src = save_llama_lm(tmp_path / "lm")
    config = CompressConfig(targets="mlp", calibrate="emoji-translate:40:de:16", calibrate_seed=0)
    result = run_compress(ModelSource(checkpoint=src), config, tmp_path / "out")
    record = result.calibration
    assert record is not None and record["samples"] == 16
    # the rows counted are the positions up to each sample's last labelled one, not the padding
    loaded = load_model(ModelSource(checkpoint=src))
    train = load_lm_data(
        "emoji-translate:40:de", hf.load_tokenizer(loaded.tokenizer_dir), None, 0.1, 0
    ).train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:16]
    labels = train.labels[order]
    pos = torch.arange(labels.shape[1]).expand_as(labels)
    last = torch.where(labels != IGNORE, pos, torch.full_like(pos, -1)).amax(dim=1)
    assert record["rows"] == int((last + 1).sum()) < labels.numel()
    assert all(r.heldout_calibrated is not None for r in result.report.layers)
