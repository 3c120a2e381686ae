"""`wasi-tool generate`: text from a causal LM (artifact, Hugging Face directory or .gguf)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wasi_tool.cli import common
from wasi_tool.errors import WasiToolError


def generate(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A causal LM: a wasi-tool artifact, a Hugging Face directory or a .gguf file.",
            show_default=False,
        ),
    ],
    prompt: Annotated[str, typer.Option(help="The prompt.", show_default=False)],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 40,
    temperature: Annotated[
        float, typer.Option(help="0: greedy; above 0: sampling at this temperature.")
    ] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sampling: keep the k likeliest.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Sampling: keep the smallest set of this mass.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat/--raw",
            help="Wrap the prompt in the tokenizer's chat template (when it has one).",
        ),
    ] = True,
) -> None:
    """Generate text from a causal LM, greedy or sampled; factored layers stay factored."""
    with common.user_errors():
        from wasi_tool.data.lm import prompt_ids, render_prompt, token_prefix
        from wasi_tool.models import hf
        from wasi_tool.models.families import task_of
        from wasi_tool.models.loading import ModelSource, load_model

        loaded = load_model(ModelSource(checkpoint=checkpoint, task=hf.CAUSAL_LM))
        if not task_of(loaded.model).next_token:
            raise WasiToolError(f"{checkpoint} is not a causal language model")
        context, _ = hf.context_length(loaded.model)
        # the settings first (before the prompt is rendered or tokenized); the prompt is
        # tokenized from a bounded prefix: one token past the context says it is too long
        hf.check_generation(loaded.model, None, max_new_tokens, temperature, top_k, top_p)
        tokenizer = hf.load_tokenizer(loaded.tokenizer_dir)
        if chat and getattr(tokenizer, "chat_template", None):
            text = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
            ids = prompt_ids(tokenizer, text, limit=context)
        else:
            ids = token_prefix(tokenizer, prompt, context + 1, add_special_tokens=True)[0]
        new = hf.generate(
            loaded.model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        typer.echo(tokenizer.decode(new, skip_special_tokens=True))
