"""Small causal LMs for tests, made here (nothing downloaded): a byte-level BPE tokenizer
trained on a few hundred emoji names, and a 2-layer random Llama around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB = 320


def make_tokenizer(chat_template: bool = True) -> Any:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    from wasi_tool.data.text import emoji_names

    corpus = [name for row in emoji_names()[:400] for name in row]
    corpus += ["Translate this emoji name from English to German: ", "<|user|>", "<|assistant|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(vocab: int, **over: Any) -> Any:
    import transformers

    kw: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
    }
    kw.update(over)
    return transformers.LlamaConfig(**kw)


def save_llama_lm(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """A 2-layer random LlamaForCausalLM and its tokenizer, as save_pretrained writes them."""
    import transformers

    tok = make_tokenizer(chat_template)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(len(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
