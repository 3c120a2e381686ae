"""Self-attention with its input projection as a module: a drop-in for ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` keeps its q/k/v projection as one bare parameter, ``in_proj_weight``
(3C x C), not as an ``nn.Linear``, so nothing that swaps linear layers (compress, WASI, LoRA)
can reach it, and its fused eval fast path reads the raw weights. ``SelfAttention`` computes the
same function (batch-first self-attention, ``need_weights=False``) with ``in_proj`` and
``out_proj`` as ``nn.Linear`` children: q, k and v are the three C-row blocks of ``in_proj``'s
output, exactly as in ``nn.MultiheadAttention``, and the attention is
``F.scaled_dot_product_attention``, which the module's own slow path also uses.

The state dict keeps ``nn.MultiheadAttention``'s names while ``in_proj`` is a plain
``nn.Linear`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``),
so a checkpoint of the original model loads, and a dense model saves, unchanged; a factored
``in_proj`` saves under its own names (``in_proj.L``, ``in_proj.R``, ``in_proj.bias``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.nn.swap import set_submodule

_MHA_NAMES = (("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias"))


class SelfAttention(nn.Module):
    """Batch-first multi-head self-attention with ``in_proj`` (C -> 3C) and ``out_proj``."""

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise WasiToolError(f"embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, float(dropout)
        self.head_dim = embed_dim // num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self._register_state_dict_hook(_to_mha_names)
        self._register_load_state_dict_pre_hook(_from_mha_names)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SelfAttention:
        """The same attention as ``mha`` (batch-first self-attention, one packed projection,
        no bias_k/bias_v, no zero_attn), sharing its parameters."""
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise WasiToolError(
                "only an nn.MultiheadAttention with one packed in_proj is supported"
            )
        if mha.bias_k is not None or mha.add_zero_attn or not mha.batch_first:
            raise WasiToolError(
                "only a batch-first nn.MultiheadAttention without bias_k/bias_v/add_zero_attn "
                "is supported"
            )
        bias = mha.in_proj_bias is not None
        with torch.device("meta"):  # every parameter is replaced by mha's own just below
            new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=bias)
        new.in_proj.weight = mha.in_proj_weight
        new.out_proj.weight = mha.out_proj.weight
        if bias:
            new.in_proj.bias = mha.in_proj_bias
            new.out_proj.bias = mha.out_proj.bias
        return new.train(mha.training)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dropout={self.dropout}"

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.in_proj(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _out(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        b, _, n, _ = out.shape
        result: torch.Tensor = self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))
        return result

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        **unsupported: Any,
    ) -> tuple[torch.Tensor, None]:
        """``nn.MultiheadAttention``'s call, for self-attention: (output, None)."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise WasiToolError("SelfAttention only computes self-attention (query = key = value)")
        given = {k: v for k, v in unsupported.items() if v is not None and v is not False}
        if need_weights or given:
            what = ", ".join(["need_weights"] * need_weights + sorted(given))
            raise WasiToolError(f"SelfAttention does not support {what}")
        return self._out(*self._qkv(query)), None

    def forward_with_cls(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output for ``x`` and the first (CLS) token's attention over the other tokens,
        averaged over heads: shape (B, N - 1)."""
        q, k, v = self._qkv(x)
        cls = ((q[:, :, :1] * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self._out(q, k, v), cls.mean(dim=1)[:, 0, 1:]


def _to_mha_names(module: nn.Module, state: dict[str, object], prefix: str, local: Any) -> None:
    if type(module.get_submodule("in_proj")) is not nn.Linear:
        return
    names = {prefix + ours: prefix + theirs for ours, theirs in _MHA_NAMES}
    # this module's entries are the last ones; rename them in place, in MHA's order
    mine = [k for k in state if k.startswith(prefix)]
    items = [(k, state.pop(k)) for k in mine]
    items.sort(key=lambda kv: kv[0] not in names)  # stable: in_proj first, as MHA has it
    state.update((names.get(k, k), v) for k, v in items)


def _from_mha_names(state: dict[str, object], prefix: str, *args: Any) -> None:
    for ours, theirs in _MHA_NAMES:
        if prefix + theirs in state:
            state[prefix + ours] = state.pop(prefix + theirs)


def replace_mha_(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` by an equal ``SelfAttention``
    (sharing the parameters); returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in names:
        mha = model.get_submodule(name)
        assert isinstance(mha, nn.MultiheadAttention)
        set_submodule(model, name, SelfAttention.from_mha(mha))
    return names
