"""Configs carry a version and are rebuilt only from the allow-list; typed results too."""

from __future__ import annotations

import pytest

from wasi_tool.bench.train import SCHEMA, TrainBenchConfig
from wasi_tool.config import CONFIGS, VERSION_KEY, load_config
from wasi_tool.errors import WasiToolError
from wasi_tool.stages import CompressConfig, FinetuneConfig
from wasi_tool.stages.export import ExportConfig
from wasi_tool.training.results import FINETUNE_SCHEMA, FinetuneMetrics


def test_every_stage_config_is_versioned_and_allow_listed() -> None:
    from wasi_tool.federated.config import FederateConfig  # registered when imported

    assert set(CONFIGS) == {"compress", "finetune", "export", "bench-train", "federate"}
    for cls in (CompressConfig, FinetuneConfig, ExportConfig, TrainBenchConfig, FederateConfig):
        data = cls().to_dict()
        assert data[VERSION_KEY] == cls.version == 1
        assert load_config(cls.stage, data) == cls()


def test_newer_or_unknown_configs_are_refused() -> None:
    data = FinetuneConfig().to_dict()
    with pytest.raises(WasiToolError, match="config_version 2"):
        FinetuneConfig.from_dict({**data, VERSION_KEY: 2})
    with pytest.raises(WasiToolError, match="unknown finetune setting"):
        FinetuneConfig.from_dict({**data, "__class__": "os.system"})
    with pytest.raises(WasiToolError, match=r"no settings of a stage 'os\.system'"):
        load_config("os.system", {})


def test_shared_defaults_are_written_once() -> None:
    eps = {CompressConfig().eps, FinetuneConfig().eps, TrainBenchConfig().eps}
    assert eps == {0.8}
    with pytest.raises(WasiToolError, match="keep_rate"):
        TrainBenchConfig.from_flat(keep_rate=0)
    with pytest.raises(WasiToolError, match="keep_rate"):
        FinetuneConfig.from_flat(method="bsr", keep_rate=1.5)


def test_metrics_schema_is_checked() -> None:
    with pytest.raises(WasiToolError, match="schema"):
        FinetuneMetrics.from_dict({"schema": "wasi-tool-finetune-metrics/1"})
    assert FINETUNE_SCHEMA.endswith("/2") and SCHEMA.endswith("/2")
