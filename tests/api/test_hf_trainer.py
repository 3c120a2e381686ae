"""Hugging Face Trainer with WASI: prepare's optimiser passed as optimizers=(opt, None)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import wasi_tool
from wasi_tool.nn.subspace import WASILinear

transformers = pytest.importorskip("transformers")


def test_trainer_runs_wasi_and_moves_the_factors(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (24, 12), generator=gen)
    labels = torch.randint(0, 3, (24,), generator=gen)
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]

    model, optimizer = wasi_tool.prepare(
        model, "wasi", "mlp", eps=0.9, lr=0.05, clip=1.0, example_input=ids[:8], verbose=False
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WASILinear)}
    assert len(layers) == 4  # intermediate.dense and output.dense of 2 layers
    before = {n: (m.L @ m.R).detach().clone() for n, m in layers.items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        max_grad_norm=0.0,  # the optimiser clips (clip=): Trainer's clip would miss WSI grads
        save_strategy="no",
        report_to=[],
        logging_steps=2,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    result = trainer.train()
    assert result.global_step == 6
    assert trainer.lr_scheduler is not None  # Trainer's own linear schedule over our groups
    for name, m in layers.items():
        assert not torch.allclose(m.L @ m.R, before[name]), name
    assert all(m.sink.p is None for m in layers.values())  # every step applied and cleared
