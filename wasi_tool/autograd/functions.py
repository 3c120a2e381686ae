"""autograd Functions for subspace-compressed linears; the math lives in ``wasi_tool.ops``.

Contract shared by all of them: the forward output is y = x W^T + b with W = L R (factored) or a
dense W; what is saved for backward is stated per Function; gradients are computed only for
the inputs that need them (``ctx.needs_input_grad``). Weight gradients of factored layers are
NOT returned to autograd: their factors (P, U) are handed to a ``GradSink`` for the layer's own
update, so no O x I gradient tensor exists. The ``*Residual*`` variants also take m sampled
residual rows of the activation (``wasi_tool.ops.residual``) and add their term, so that the
weight gradient is an unbiased estimate of the exact one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from wasi_tool.ops.residual import residual_grad_factors, residual_weight_grad
from wasi_tool.ops.tucker import lowrank_weight_and_bias_grad, lowrank_weight_grad_factors


@dataclass
class GradSink:
    """Receives the weight-gradient factors of one backward: G = P U^T (U None: G = P).

    ``orthonormal`` says whether U has orthonormal columns, so that ||G||_F = ||P||_F; stacked
    factors (a layer called twice, or a residual term added) do not."""

    p: torch.Tensor | None = None
    u: torch.Tensor | None = None
    orthonormal: bool = True

    def add(self, p: torch.Tensor, u: torch.Tensor | None, orthonormal: bool = True) -> None:
        if self.p is None:
            self.p, self.u, self.orthonormal = p, u, orthonormal
        elif self.u is None and u is None:
            self.p = self.p + p
        else:  # a layer called twice in one step: stack the factors, G = [P1 P2] [U1 U2]^T
            assert self.u is not None and u is not None
            self.p = torch.cat([self.p, p], dim=1)
            self.u = torch.cat([self.u, u], dim=1)
            self.orthonormal = False

    def sq_norm(self) -> torch.Tensor | None:
        """||G||_F^2 from the factors (None when empty): ||P||^2, or tr((P^T P)(U^T U))."""
        if self.p is None:
            return None
        if self.u is None or self.orthonormal:
            return self.p.pow(2).sum()
        return ((self.p.T @ self.p) * (self.u.T @ self.u)).sum()

    def clear(self) -> None:
        self.p = self.u = None
        self.orthonormal = True


def _factored_forward(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return F.linear(F.linear(x, right), left, bias)


def _factored_input_grad(
    grad_out: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    return (grad_out @ left) @ right  # dA = (dY L) R


def _bias_grad(grad_out: torch.Tensor) -> torch.Tensor:
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)


class WASIFunction(torch.autograd.Function):
    """Factored weight, Tucker-compressed activation. Saves S, U_1..U_M, L, R (not x)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        bias: torch.Tensor | None,
        sink: GradSink,
        core: torch.Tensor,
        *bases: torch.Tensor,
    ) -> torch.Tensor:
        ctx.sink = sink
        ctx.has_bias = bias is not None
        ctx.save_for_backward(left, right, core, *bases)
        return _factored_forward(x, left, right, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        left, right, core, *bases = ctx.saved_tensors
        grad_x = _factored_input_grad(grad_out, left, right) if ctx.needs_input_grad[0] else None
        need_b = ctx.has_bias and ctx.needs_input_grad[3]
        grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if need_b:  # the bias gradient as one more column of P's GEMM
                p, u, grad_b = lowrank_weight_and_bias_grad(grad_out, core, bases)
                ctx.sink.add(p, u)
            else:
                ctx.sink.add(*lowrank_weight_grad_factors(grad_out, core, bases))
        elif need_b:
            grad_b = _bias_grad(grad_out)
        return (grad_x, None, None, grad_b, None, None, *([None] * len(bases)))


class WSIFunction(torch.autograd.Function):
    """Factored weight, full activation. Saves x, L, R; G = dY^T x goes to the sink as P."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        bias: torch.Tensor | None,
        sink: GradSink,
    ) -> torch.Tensor:
        ctx.sink = sink
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, left, right)
        return _factored_forward(x, left, right, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, left, right = ctx.saved_tensors
        grad_x = _factored_input_grad(grad_out, left, right) if ctx.needs_input_grad[0] else None
        grad_b = _bias_grad(grad_out) if ctx.has_bias and ctx.needs_input_grad[3] else None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_dy = grad_out.reshape(-1, grad_out.shape[-1])
            ctx.sink.add(flat_dy.T @ x.reshape(-1, x.shape[-1]), None)
        return grad_x, None, None, grad_b, None


class ASIFunction(torch.autograd.Function):
    """Dense weight, Tucker-compressed activation. Saves S, U_1..U_M, W; returns dense dW."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        core: torch.Tensor,
        *bases: torch.Tensor,
    ) -> torch.Tensor:
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, core, *bases)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, core, *bases = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            if need_b:  # the bias gradient as one more column of P's GEMM
                p, u, grad_b = lowrank_weight_and_bias_grad(grad_out, core, bases)
            else:
                p, u = lowrank_weight_grad_factors(grad_out, core, bases)
            grad_w = p @ u.T
        elif need_b:
            grad_b = _bias_grad(grad_out)
        return (grad_x, grad_w, grad_b, None, *([None] * len(bases)))


class WASIResidualFunction(torch.autograd.Function):
    """WASIFunction plus m sampled residual rows: the sink gets G^ = P U^T + Q V^T, an unbiased
    estimate of dY^T x. Saves S, U_1..U_M, L, R, the rows (m x I) and their indices (m)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        bias: torch.Tensor | None,
        sink: GradSink,
        rows: torch.Tensor,
        index: torch.Tensor,
        core: torch.Tensor,
        *bases: torch.Tensor,
    ) -> torch.Tensor:
        ctx.sink = sink
        ctx.has_bias = bias is not None
        ctx.save_for_backward(left, right, rows, index, core, *bases)
        return _factored_forward(x, left, right, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        left, right, rows, index, core, *bases = ctx.saved_tensors
        grad_x = _factored_input_grad(grad_out, left, right) if ctx.needs_input_grad[0] else None
        need_b = ctx.has_bias and ctx.needs_input_grad[3]
        grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if need_b:
                p, u, grad_b = lowrank_weight_and_bias_grad(grad_out, core, bases)
                ctx.sink.add(p, u)
            else:
                ctx.sink.add(*lowrank_weight_grad_factors(grad_out, core, bases))
            ctx.sink.add(*residual_grad_factors(grad_out, rows, index), orthonormal=False)
        elif need_b:
            grad_b = _bias_grad(grad_out)
        return (grad_x, None, None, grad_b, None, None, None, None, *([None] * len(bases)))


class ASIResidualFunction(torch.autograd.Function):
    """ASIFunction plus m sampled residual rows: dW^ = P U^T + dY_index^T rows, an unbiased
    estimate of dY^T x. Saves S, U_1..U_M, W, the rows (m x I) and their indices (m)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        index: torch.Tensor,
        core: torch.Tensor,
        *bases: torch.Tensor,
    ) -> torch.Tensor:
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, rows, index, core, *bases)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, rows, index, core, *bases = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            if need_b:
                p, u, grad_b = lowrank_weight_and_bias_grad(grad_out, core, bases)
            else:
                p, u = lowrank_weight_grad_factors(grad_out, core, bases)
            grad_w = p @ u.T + residual_weight_grad(grad_out, rows, index)
        elif need_b:
            grad_b = _bias_grad(grad_out)
        return (grad_x, grad_w, grad_b, None, None, None, *([None] * len(bases)))
