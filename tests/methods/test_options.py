"""Per-method options: each method module owns its options class, the registry names it, and
configs hold the method's options object while recipes and stored configs keep flat keys."""

from __future__ import annotations

import dataclasses

import pytest

from wasi_tool.bench.train import TrainBenchConfig
from wasi_tool.errors import WasiToolError
from wasi_tool.federated.config import FederateConfig
from wasi_tool.methods import (
    METHODS,
    BsrOptions,
    LoraOptions,
    MezoOptions,
    get_method,
    option_keys,
    options_classes,
)
from wasi_tool.training.config import FinetuneConfig

BASELINE_KEYS = {
    "bsr_blocks", "drop_at", "keep_rate", "fuse", "lora_rank", "lora_alpha", "lora_dropout",
    "lora_recompute", "lora_fa_projection", "mezo_mu",
}  # fmt: skip


def test_each_method_names_its_options_class() -> None:
    assert get_method("lora").options is get_method("lora-fa").options is LoraOptions
    assert get_method("bsr").options is get_method("bsr+wasi").options is BsrOptions
    assert get_method("mezo").options is MezoOptions
    for name in ("vanilla", "asi", "wsi", "wasi", "asi-fixed", "wasi-fixed"):
        assert METHODS[name].options is None
    assert set(options_classes()) == {LoraOptions, BsrOptions, MezoOptions}
    assert set(option_keys()) == BASELINE_KEYS
    assert LoraOptions.__module__ == "wasi_tool.methods.lora"
    assert BsrOptions.__module__ == "wasi_tool.methods.bsr"


def test_finetune_config_holds_no_method_specific_field() -> None:
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert not fields & BASELINE_KEYS
    assert "options" in fields


def test_the_method_gets_its_default_options_and_refuses_another_class() -> None:
    assert FinetuneConfig(method="lora").options == LoraOptions()
    assert FinetuneConfig(method="wasi").options is None
    cfg = FinetuneConfig(method="lora", options=LoraOptions(rank=4))
    assert cfg == FinetuneConfig.from_flat(method="lora", lora_rank=4)
    with pytest.raises(WasiToolError, match="method bsr takes BsrOptions, got LoraOptions"):
        FinetuneConfig(method="bsr", options=LoraOptions())
    with pytest.raises(WasiToolError, match="method wasi takes no options"):
        FinetuneConfig(method="wasi", options=MezoOptions())


def test_options_validate_themselves_by_flat_key() -> None:
    with pytest.raises(WasiToolError, match="lora_rank must be >= 1"):
        LoraOptions(rank=0)
    with pytest.raises(WasiToolError, match="mezo_mu"):
        MezoOptions(mu=-1.0)
    with pytest.raises(WasiToolError, match="keep_rate"):
        BsrOptions(keep_rate=0.0)
    assert BsrOptions(blocks=[3.0, 7]).blocks == [3, 7]  # type: ignore[list-item]


def test_flat_keys_round_trip_through_to_dict() -> None:
    cfg = FinetuneConfig.from_flat(method="bsr", bsr_blocks=[1, 3], keep_rate=0.7, fuse=False)
    assert cfg.options == BsrOptions(blocks=[1, 3], keep_rate=0.7, fuse=False)
    data = cfg.to_dict()
    assert (data["bsr_blocks"], data["keep_rate"], data["fuse"]) == ([1, 3], 0.7, False)
    assert "options" not in data and "lora_rank" not in data
    assert FinetuneConfig.from_dict(data) == cfg


def test_a_key_of_another_method_is_refused_unless_at_its_default() -> None:
    with pytest.raises(WasiToolError, match="lora_rank is a setting of lora, lora-fa, not of"):
        FinetuneConfig.from_flat(method="wasi", lora_rank=4)
    with pytest.raises(WasiToolError, match="keep_rate is a setting of bsr, bsr\\+wasi"):
        FinetuneConfig.from_dict({"method": "lora", "keep_rate": 0.3})
    # configs stored before per-method options hold every method's options at their defaults
    old = {**FinetuneConfig(method="wasi").to_dict(), "lora_rank": 8, "keep_rate": 0.5}
    assert FinetuneConfig.from_dict(old) == FinetuneConfig(method="wasi")
    with pytest.raises(WasiToolError, match="not both"):
        FinetuneConfig.from_flat(method="lora", options=LoraOptions(), lora_rank=2)


def test_federate_and_the_bench_share_the_parts_and_carry_the_options() -> None:
    fed = FederateConfig.from_flat(method="lora", lora_rank=3, act_order="parallel", clients=2)
    local = fed.round_config(1, 1)
    assert local.options == LoraOptions(rank=3) and local.act_order == "parallel"
    assert FederateConfig.from_dict(fed.to_dict()) == fed
    bench = TrainBenchConfig.from_flat(method="lora,mezo,wasi", lora_rank=4, mezo_mu=0.01)
    assert bench.method_config("lora").options == LoraOptions(rank=4)
    assert bench.method_config("mezo").options == MezoOptions(mu=0.01)
    assert bench.method_config("wasi").options is None
    data = bench.to_dict()
    assert set(data) >= BASELINE_KEYS  # every method's options, flat, as before
    assert TrainBenchConfig.from_dict(data) == bench
    # the shared parts are inherited, never re-declared: the class bodies declare only their own
    assert set(FinetuneConfig.__annotations__) == {"stage", "options", "match_memory"}
    assert set(TrainBenchConfig.__annotations__) - {"stage"} == {
        "checkpoint", "arch", "num_classes", "img_size", "random_init", "act_ranks_by_layer",
        "settings_from", "steps", "warmup", "allocator", "threads", "method_options",
    }  # fmt: skip


def test_a_recipe_bench_stage_takes_every_training_bench_setting() -> None:
    from pathlib import Path

    from wasi_tool.pipeline.kinds import KINDS, _train_bench_config
    from wasi_tool.pipeline.spec import StageSpec

    assert {"lora_rank", "keep_rate", "mezo_mu", "act_eps", "allocator"} <= KINDS["bench"].options
    options = {"train": True, "method": "lora,wasi", "lora_rank": 4, "act_order": "parallel"}
    spec = StageSpec("b", "bench", "tune", {}, {}, options, 1)
    config = _train_bench_config(spec, Path("runs"), ran=False)
    assert config.method_config("lora").options == LoraOptions(rank=4)
    assert config.act_order == "parallel" and config.checkpoint == str(Path("runs") / "tune")
