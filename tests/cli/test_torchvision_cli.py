"""The paper's own models, torchvision's vit_b_32 and swin_t (random init, saved as torchvision
state dicts), through compress -> finetune -> export -> bench on the CLI; at full rank the
compressed model's logits equal torchvision's.

In CI they run as ``wasi-tool run`` recipes naming the real archs (``torchvision:vit_b_32``,
``torchvision:swin_t``) with small widths of the same classes (``model_kwargs``), since
ViT-B/32's 88M parameters take minutes per stage on 2 shared cores. The full-size models go
through the separate commands in ``test_full_size_models_on_the_cli``, which runs when
``WASI_TOOL_FULL_SIZE=1`` (``WASI_TOOL_FULL_SIZE=1 pytest tests/cli/test_torchvision_cli.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from typer.testing import CliRunner

from wasi_tool.cli.app import app
from wasi_tool.models import ModelSource, load_model

runner = CliRunner()
SIZE = 64  # ViT-B/32 at 64 px: 4 patches + CLS; Swin-T at 64 px: 16x16 tokens in stage 1


def invoke(*args: str | Path) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


# small widths of the same classes: torchvision's constructor arguments, and wasi-tool's names
SMALL_TV: dict[str, dict[str, Any]] = {
    "vit_b_32": {"hidden_dim": 64, "num_layers": 4, "num_heads": 2, "mlp_dim": 256},
    "swin_t": {"embed_dim": 16, "num_heads": [1, 2, 4, 8]},
}
SMALL: dict[str, dict[str, Any]] = {
    "vit_b_32": {"embed_dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 4.0},
    "swin_t": {"embed_dim": 16, "num_heads": 1},
}


def _checkpoint(tmp_path: Path, name: str, small: bool = False) -> tuple[torch.nn.Module, Path]:
    """torchvision's own builder (weights=None), or its class at a small width; saved as a
    plain state dict."""
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"num_classes": 5}
    if name.startswith("vit"):
        kwargs["image_size"] = SIZE
    if small:
        from torchvision.models.swin_transformer import SwinTransformer
        from torchvision.models.vision_transformer import VisionTransformer

        if name.startswith("vit"):
            ref = VisionTransformer(patch_size=32, **kwargs, **SMALL_TV[name])
        else:
            ref = SwinTransformer(
                patch_size=[4, 4], depths=[2, 2, 6, 2], window_size=[7, 7],
                stochastic_depth_prob=0.2, **kwargs, **SMALL_TV[name],
            )  # fmt: skip
    else:
        ref = torchvision.models.get_model(name, weights=None, **kwargs)
    ref.eval()
    if name.startswith("vit"):  # torchvision's ViT head starts at zero: make the logits count
        torch.nn.init.normal_(ref.heads.head.weight, std=0.5)
        path = tmp_path / f"{name}.pth"
        torch.save(ref.state_dict(), path)
    else:
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    return ref, path


RECIPE = """
[pipeline]
name = "tv"

[[stages]]
name = "full"
kind = "compress"
source = {{ checkpoint = "{ckpt}", arch = "torchvision:{name}", img_size = {size}, \
    model_kwargs = {kwargs} }}
targets = "mlp"
rank_ratio = 1.0
force = true

[[stages]]
name = "small"
kind = "compress"
input = "full"
rank_ratio = 0.25

[[stages]]
name = "wasi"
kind = "finetune"
input = "small"
data = "digits"
method = "wasi"
act_ranks = [2, 2, 8]
epochs = 1
batch_size = 4
max_steps = 2

[[stages]]
name = "export"
kind = "export"
input = "wasi"

[[stages]]
name = "bench"
kind = "bench"
input = "export"
repeats = 3
warmup = 1
"""

BSR_STAGES = """
[[stages]]
name = "bsr"
kind = "finetune"
input = "full"
data = "digits"
method = "bsr"
keep_rate = 0.5
epochs = 1
batch_size = 4
max_steps = 1

[[stages]]
name = "export-bsr"
kind = "export"
input = "bsr"
"""


def _toml(value: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_32", "swin_t"])
def test_recipe_compress_finetune_export_bench(tmp_path: Path, name: str) -> None:
    ref, ckpt = _checkpoint(tmp_path, name, small=True)
    recipe = tmp_path / "tv.toml"
    text = RECIPE.format(ckpt=ckpt, name=name, size=SIZE, kwargs=_toml(SMALL[name]))
    recipe.write_text(text + (BSR_STAGES if name.startswith("vit") else ""))
    run = tmp_path / "run"
    invoke("run", recipe, "--out", run)
    # at full rank the compressed model's logits equal torchvision's
    loaded = load_model(ModelSource(checkpoint=run / "full"))
    assert loaded.arch == f"torchvision:{name}" and loaded.model_kwargs["num_classes"] == 5
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x), atol=1e-5, rtol=1e-4)
    # wasi trained the factors; the export passed its ONNX checks; the bench ran
    metrics = json.loads((run / "wasi" / "metrics.json").read_text())
    assert metrics["method"] == "wasi" and len(metrics["targets"]) == (8 if "vit" in name else 24)
    before = load_model(ModelSource(checkpoint=run / "small")).model.state_dict()
    after = load_model(ModelSource(checkpoint=run / "wasi")).model.state_dict()
    first = next(k for k in before if k.endswith("mlp.0.L"))
    assert not torch.equal(after[first], before[first])
    report = json.loads((run / "export" / "report.json").read_text())
    assert report["checks"] and all(c["passed"] for c in report["checks"])
    assert (run / "bench").is_dir()
    if name.startswith("vit"):  # BSR with token dropping, kept in the ONNX graph
        tokens = _find(json.loads((run / "bsr" / "metrics.json").read_text()), "tokens_per_block")
        assert tokens == [5, 5, 4, 4]  # 4 patches -> 2 kept + 1 fused at block 1 (of 0..3)
        report = json.loads((run / "export-bsr" / "report.json").read_text())
        assert all(c["passed"] for c in report["checks"])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("WASI_TOOL_FULL_SIZE") != "1",
    reason="full-size models: set WASI_TOOL_FULL_SIZE=1",
)
@pytest.mark.parametrize("name", ["vit_b_32", "swin_t"])
def test_full_size_models_on_the_cli(tmp_path: Path, name: str) -> None:
    ref, ckpt = _checkpoint(tmp_path, name)
    arch = f"torchvision:{name}"
    full = tmp_path / "full"
    size = [] if name.startswith("vit") else ["--img-size", str(SIZE)]  # ViT: read from weights
    invoke("compress", ckpt, "--arch", arch, *size, "--targets", "mlp", "--rank-ratio", "1",
           "--force", "--out", full)  # fmt: skip
    loaded = load_model(ModelSource(checkpoint=full))
    assert loaded.arch == arch and loaded.model_kwargs["num_classes"] == 5
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x), atol=1e-5, rtol=1e-4)
    small = tmp_path / "small"  # re-compressed from the factors, to keep the steps quick
    invoke("compress", full, "--rank-ratio", "0.05", "--out", small)
    tuned = tmp_path / "tuned"
    invoke("finetune", small, "--data", "digits", "--method", "wasi", "--act-ranks", "2,2,8",
           "--epochs", "1", "--batch-size", "4", "--max-steps", "2", "--out", tuned)  # fmt: skip
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["method"] == "wasi" and len(metrics["targets"]) == 24
    exported = tmp_path / "export"
    invoke("export", tuned, "--onnx", "--out", exported)
    report = json.loads((exported / "report.json").read_text())
    assert report["checks"] and all(c["passed"] for c in report["checks"])
    out = tmp_path / "bench.json"
    invoke("bench", exported / "model.onnx", "--repeats", "3", "--warmup", "1", "--json", out)
    assert json.loads(out.read_text())


def _find(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            found = _find(item, key)
            if found is not None:
                return found
    return None
