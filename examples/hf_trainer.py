"""WASI inside a Hugging Face Trainer: prepare the model, hand the optimiser to the Trainer.

    python examples/hf_trainer.py --tiny        # a random-init tiny BERT, random tokens

The recipe: ``wasi_tool.prepare`` returns a ``torch.optim.Optimizer`` (SubspaceSGD) that does
the WSI update of the factored layers inside ``step()``; pass it as
``optimizers=(optimizer, None)`` and the Trainer builds its own LR schedule over it. Set
``max_grad_norm=0`` and clip with ``prepare(clip=...)`` instead: the Trainer's clip only sees
``.grad`` tensors, and the WSI factors keep their gradient factored. No callback is needed.
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import wasi_tool


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="2 layers, width 32, 8 steps")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="runs/hf-trainer-wasi")
    args = p.parse_args()
    width, layers, steps = (32, 2, 8) if args.tiny else (128, 4, args.steps)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * width,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)  # from_pretrained(...) with your checkpoint
    # toy task: is token 7 in the sequence?
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (256, 16), generator=gen)
    labels = (ids == 7).any(-1).long()
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]

    model, optimizer = wasi_tool.prepare(
        model, "wasi", "mlp", eps=0.9, lr=0.05, clip=1.0, example_input=ids[:16]
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=steps,
            per_device_train_batch_size=16,
            max_grad_norm=0.0,
            save_strategy="no",
            report_to=[],
            logging_steps=max(1, steps // 4),
            use_cpu=True,
        ),
        train_dataset=data,
        optimizers=(optimizer, None),
    )
    result = trainer.train()
    print(f"trained {result.global_step} steps, final loss {result.training_loss:.3f}")


if __name__ == "__main__":
    main()
