"""Causal LMs: a 2-layer random Llama (save_pretrained) and the same model written as a GGUF
file by the ``gguf`` package; next-token loss, masking, every method, generation, export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.models.llm_fixtures import (
    CHAT_TEMPLATE,
    llama_config,
    make_tokenizer,
    save_llama_lm,
    write_gguf,
)
from wasi_tool.cli.app import app
from wasi_tool.data import lm
from wasi_tool.errors import WasiToolError
from wasi_tool.methods import LayerOptions, SubspaceSGD, prepare_
from wasi_tool.models import hf
from wasi_tool.models.loading import ModelSource, load_model
from wasi_tool.models.targets import select_targets
from wasi_tool.stages.compress import CompressConfig, compress_
from wasi_tool.stages.export import ExportConfig, run_export
from wasi_tool.stages.finetune import FinetuneConfig, run_finetune
from wasi_tool.training.loop import train_step
from wasi_tool.training.loss import IGNORE, task_loss
from wasi_tool.training.prepare import prepare_for_training

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama_lm(tmp_path_factory.mktemp("llama-lm"))


@pytest.fixture(scope="module")
def tokenizer(lm_dir: Path) -> object:
    return hf.load_tokenizer(lm_dir)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory, lm_dir: Path) -> Path:
    pytest.importorskip("gguf")
    model = transformers.LlamaForCausalLM.from_pretrained(str(lm_dir)).eval()
    tok = make_tokenizer()
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tok, CHAT_TEMPLATE)


def test_causal_lm_loads_from_directory(lm_dir: Path) -> None:
    loaded = load_model(ModelSource(checkpoint=lm_dir))
    model = loaded.model
    assert hf.is_causal_lm(model) and loaded.model_kwargs["task"] == hf.CAUSAL_LM
    x = torch.randint(3, 300, (2, 9))
    assert model(x).shape == (2, 9, model.config.vocab_size)
    # a class count (or --task classify) still gives the sequence classifier
    cls = load_model(ModelSource(checkpoint=lm_dir, num_classes=3)).model
    assert not hf.is_causal_lm(cls) and cls(x).shape == (2, 3)
    with pytest.raises(WasiToolError, match="task must be one of"):
        load_model(ModelSource(checkpoint=lm_dir, task="seq2seq"))


def test_loss_masking_by_hand(tokenizer: object) -> None:
    """Labels are the next token inside the response (its end-of-sequence included), -100 on
    the prompt and on padding; the loss is the mean over exactly those tokens."""
    tok = tokenizer
    examples = [lm.Example("ab\n", "cd"), lm.Example("a longer prompt\n", "x")]
    ds = lm.encode_examples(tok, examples, 64, "test")
    eos, pad = tok.eos_token_id, tok.pad_token_id  # type: ignore[attr-defined]
    for i, ex in enumerate(examples):
        p = tok(ex.prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        r = [*tok(ex.response, add_special_tokens=False)["input_ids"], eos]  # type: ignore[operator]
        full = p + r
        ids, labels = ds[i]
        n = min(len(full), ids.shape[0])  # the last token is only ever a label
        assert len(full) - 1 <= ids.shape[0]
        assert ids[:n].tolist() == full[:n] and set(ids[n:].tolist()) <= {pad}
        expected = [IGNORE] * ids.shape[0]
        for t in range(len(p) - 1, len(full) - 1):
            expected[t] = full[t + 1]  # position t predicts the token after it
        assert labels.tolist() == expected
        assert ds.answers[i] == ex.response and ds.prompts[i] == p
    # the loss by hand: log-softmax at the labelled positions only
    ids, labels = ds.ids, ds.labels
    logits = torch.randn(*ids.shape, 320, generator=torch.Generator().manual_seed(0))
    picked = [
        -torch.log_softmax(logits[b, t], -1)[labels[b, t]]
        for b in range(ids.shape[0])
        for t in range(ids.shape[1])
        if labels[b, t] != IGNORE
    ]
    torch.testing.assert_close(task_loss(logits, labels), torch.stack(picked).mean())


def test_full_rank_wasi_equals_vanilla_causal_lm(lm_dir: Path) -> None:
    """Every MLP linear at full weight and activation rank: two clipped WASI steps on the
    next-token loss give vanilla SGD's weights and logits (float64)."""
    ref = load_model(ModelSource(checkpoint=lm_dir)).model.double()
    targets = select_targets(ref, "mlp")
    model = copy.deepcopy(ref)
    compress_(model, CompressConfig(targets="mlp", eps=1.0, force=True))
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randint(3, 300, (4, 7), generator=gen) for _ in range(3)]
    ys = [torch.cat([x[:, 1:], torch.full((4, 1), IGNORE)], 1) for x in xs]
    ys[0][:, :3] = IGNORE  # a prompt
    options = {
        n: LayerOptions((4, 7, model.get_submodule(n).in_features))  # type: ignore[arg-type]
        for n in targets
    }
    prepare_(model, "wasi", targets, options)
    prepare_(ref, "vanilla", targets, {n: LayerOptions(None) for n in targets})
    ref.train()
    model.train()
    opt_ref = SubspaceSGD(ref, lr=0.5, weight_decay=1e-2, clip=0.5)
    opt = SubspaceSGD(model, lr=0.5, weight_decay=1e-2, clip=0.5)
    for x, y in zip(xs[:2], ys[:2], strict=True):
        a = train_step(ref, opt_ref, x, y)
        b = train_step(model, opt, x, y)
        torch.testing.assert_close(b.loss, a.loss)
        assert opt.last_clip_coef < 1.0  # the clip was active
    for n in targets:
        torch.testing.assert_close(
            model.get_submodule(n).L @ model.get_submodule(n).R,  # type: ignore[operator]
            ref.get_submodule(n).weight,
        )
    ref.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(xs[2]), ref(xs[2]))


def test_finetune_causal_lm_on_emoji_translate(lm_dir: Path, tmp_path: Path) -> None:
    cfg = FinetuneConfig(
        method="wasi",
        targets="mlp@last1",
        epochs=1,
        batch_size=4,
        max_steps=2,
        eps=0.9,
        lr=0.5,
        seq_len=64,
        eval_examples=2,
    )
    res = run_finetune(ModelSource(checkpoint=lm_dir), "emoji-translate:12:de", cfg, tmp_path / "f")
    m = res.metrics.to_dict()
    assert m["targets"] == [
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert m["measured"]["steps"] == 2 and m["analytic"]["layers"][0]["act_shape"] == [4, 64, 32]
    before, after = m["lm"]["before"], m["lm"]["after"]
    assert after["exact_match_count"] == 2 and after["samples"][0]["prompt"].startswith("<|user|>")
    assert after["perplexity"] == pytest.approx(2.718281828 ** m["final"]["test_loss"])
    assert after["loss"] < before["loss"]  # two steps at a large lr already help
    assert (tmp_path / "f" / "chat_template.jinja").is_file()
    again = load_model(ModelSource(checkpoint=tmp_path / "f"))
    assert hf.is_causal_lm(again.model)
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight  # re-tied
    x = torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), res.loaded.model(x))
    out = CliRunner().invoke(
        app, ["generate", str(tmp_path / "f"), "--prompt", "cat", "--max-new-tokens", "3"]
    )
    assert out.exit_code == 0, out.output


@pytest.mark.parametrize("method", ["vanilla", "asi", "wsi", "lora", "bsr"])
def test_every_method_trains_a_causal_lm(lm_dir: Path, method: str) -> None:
    model = load_model(ModelSource(checkpoint=lm_dir)).model
    cfg = FinetuneConfig(method=method, targets="mlp@last1", act_ranks=[2, 4, 8], lr=0.1)
    if method not in ("asi", "wasi"):
        cfg = FinetuneConfig(method=method, targets="mlp@last1", lr=0.1)
    ranks = {n: (2, 4, 8) for n in select_targets(model, "mlp@last1")}
    prepared = prepare_for_training(model, cfg, lambda t: (ranks, {"rule": "explicit"}))
    model.train()
    opt = SubspaceSGD(model, lr=0.1, clip=1.0)
    x = torch.randint(3, 300, (2, 8))
    y = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE)], 1)
    first = train_step(model, opt, x, y).loss
    assert torch.isfinite(torch.tensor(first)) and prepared.targets
    if method == "lora":  # adapters only: the pretrained vocabulary head stays frozen
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_memory_mode_block_equals_off_on_a_causal_lm(lm_dir: Path) -> None:
    losses = {}
    for mode in ("off", "block"):
        torch.manual_seed(0)
        model = load_model(ModelSource(checkpoint=lm_dir)).model
        cfg = FinetuneConfig(method="wasi", targets="mlp@last1", eps=0.9, memory_mode=mode)
        ranks = {n: (2, 4, 8) for n in select_targets(model, "mlp@last1")}
        prepare_for_training(model, cfg, lambda t, r=ranks: (r, {"rule": "explicit"}))
        model.train()
        opt = SubspaceSGD(model, lr=0.1, clip=1.0)
        x = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(0))
        y = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE)], 1)
        losses[mode] = [train_step(model, opt, x, y).loss for _ in range(2)]
    assert losses["block"] == pytest.approx(losses["off"], rel=1e-6)


def test_text_and_jsonl_data(tokenizer: object, tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text(" ".join(["grinning face with big eyes"] * 60))
    splits = lm.load_lm_data(txt, tokenizer, seq_len=16, val_fraction=0.2)
    train = splits.train
    assert isinstance(train, lm.LMDataset) and train.ids.shape[1] == 16
    ids, labels = train[0]
    assert labels[:-1].tolist() == ids[1:].tolist()  # every token is a target
    rows = [
        {"prompt": "cat", "response": "katze"},
        {
            "messages": [
                {"role": "user", "content": "dog"},
                {"role": "assistant", "content": "hund"},
            ]
        },
        {"prompt": "fish", "response": "fisch"},
    ]
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = lm.load_lm_data(jl, tokenizer, val_fraction=0.34)
    both = [*splits.train.answers, *splits.test.answers]  # type: ignore[attr-defined]
    assert sorted(both) == ["fisch", "hund", "katze"]
    jl.write_text('{"prompt": 1}\n{"prompt": "a", "response": "b"}\n')
    with pytest.raises(WasiToolError, match=r"pairs.jsonl:1: expected"):
        lm.load_lm_data(jl, tokenizer)


def test_emoji_translate_splits_by_emoji(tokenizer: object) -> None:
    splits = lm.load_lm_data("emoji-translate:20:de,fr", tokenizer, val_fraction=0.2)
    train, test = splits.train, splits.test
    assert len(test) == 4 * 2 and len(train) == 16 * 2  # type: ignore[arg-type]

    def english(ds: object) -> set[str]:
        return {p.rsplit(": ", 1)[1].split("\n")[0] for p in map(tokenizer.decode, ds.prompts)}  # type: ignore[attr-defined]

    assert not english(train) & english(test)
    with pytest.raises(WasiToolError, match="languages are among"):
        lm.load_lm_data("emoji-translate:20:xx", tokenizer)


def test_gguf_loads_generates_finetunes_and_exports(
    gguf_file: Path, lm_dir: Path, tmp_path: Path
) -> None:
    """A GGUF written by the gguf package loads to the same logits as the directory it came
    from, with its tokenizer and chat template; it generates, fine-tunes and exports."""
    loaded = load_model(ModelSource(checkpoint=gguf_file))
    ref = load_model(ModelSource(checkpoint=lm_dir)).model
    assert loaded.source["kind"] == "gguf" and hf.is_causal_lm(loaded.model)
    x = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x), atol=1e-5, rtol=1e-5)
    tok = hf.load_tokenizer(loaded.tokenizer_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    runner = CliRunner()
    res = runner.invoke(
        app, ["generate", str(gguf_file), "--prompt", "cat", "--max-new-tokens", "4"]
    )
    assert res.exit_code == 0, res.output
    greedy = [
        runner.invoke(
            app,
            ["generate", str(gguf_file), "--prompt", "cat", "--temperature", "0.9",
             "--top-k", "20", "--top-p", "0.9", "--seed", str(s), "--max-new-tokens", "6"],
        ).output
        for s in (1, 1, 2)
    ]  # fmt: skip
    assert greedy[0] == greedy[1]  # the seed decides the sample
    cfg = FinetuneConfig(
        method="wasi", targets="mlp", epochs=1, batch_size=4, max_steps=1, eps=0.9,
        seq_len=64, eval_examples=1,
    )  # fmt: skip
    run_finetune(ModelSource(checkpoint=gguf_file), "emoji-translate:8:de", cfg, tmp_path / "f")
    assert (tmp_path / "f" / "chat_template.jinja").is_file()
    ex = run_export(ModelSource(checkpoint=tmp_path / "f"), ExportConfig(), tmp_path / "e")
    assert ex.checks and all(c.passed for c in ex.checks)
    from wasi_tool import onnxio

    sess = onnxio.session(tmp_path / "e" / "model.onnx")
    again = load_model(ModelSource(checkpoint=tmp_path / "e")).model
    with torch.no_grad():
        ref_logits = again(x).numpy()
    got = onnxio.run(sess, x.numpy())
    assert got.shape == (2, 9, again.config.vocab_size)
    torch.testing.assert_close(
        torch.from_numpy(got), torch.from_numpy(ref_logits), atol=1e-4, rtol=1e-4
    )


def test_corrupt_gguf_is_one_line_and_exit_1(gguf_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[:5000])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    for bad in (truncated, garbage):
        out = tmp_path / f"out-{bad.stem}"
        res = runner.invoke(
            app, ["finetune", str(bad), "--data", "emoji-translate:8", "--out", str(out)]
        )
        assert res.exit_code == 1, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]  # stdout: progress only
        assert len(lines) == 1 and lines[0].startswith("error:") and "GGUF" in lines[0]
        assert not out.exists()


def test_random_init_from_a_config_directory(lm_dir: Path, tmp_path: Path) -> None:
    """--random-init with a directory holding only a config.json: its shapes, seeded values."""
    (tmp_path / "config.json").write_text(
        llama_config(320, architectures=["LlamaForCausalLM"]).to_json_string()
    )
    a = load_model(ModelSource(checkpoint=tmp_path, random_init=True, seed=3)).model
    b = load_model(ModelSource(checkpoint=tmp_path, random_init=True, seed=3)).model
    assert hf.is_causal_lm(a)
    torch.testing.assert_close(
        a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight
    )
