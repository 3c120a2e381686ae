"""FactoredLinear: a linear layer stored as two factors, y = (x R^T) L^T + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wasi_tool.ops.svd import Spectrum, factored_spectrum, spectrum, truncate


class FactoredLinear(nn.Module):
    """Rank-K linear: L (O x K, orthonormal columns after SVD), R (K x I), optional bias.

    The forward runs two GEMMs and never forms the O x I weight, so it costs
    2 K (O + I) FLOPs per token instead of 2 O I.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} outside [1, {min(in_features, out_features)}]")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.L = nn.Parameter(torch.empty(out_features, rank, **kw))  # type: ignore[arg-type]
        self.R = nn.Parameter(torch.empty(rank, in_features, **kw))  # type: ignore[arg-type]
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None  # type: ignore[arg-type]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A random orthonormal L and a Gaussian R (as for a fresh layer; SVD overwrites both)."""
        nn.init.orthogonal_(self.L)
        nn.init.normal_(self.R, std=self.in_features**-0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_factors(
        cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None
    ) -> FactoredLinear:
        """A layer holding copies of ``left`` (O x K), ``right`` (K x I) and ``bias``.

        Built with ``skip_init``: the random init of a fresh layer (a QR of O x K) is skipped.
        """
        (out_features, rank), in_features = left.shape, right.shape[1]
        if right.shape[0] != rank:
            raise ValueError(
                f"factor shapes {tuple(left.shape)} and {tuple(right.shape)} differ in K"
            )
        new = torch.nn.utils.skip_init(
            cls,
            in_features,
            out_features,
            rank,
            bias=bias is not None,
            device=left.device,
            dtype=left.dtype,
        )
        new.load_factors(left, right, bias)
        return new

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, spec: Spectrum | None = None
    ) -> FactoredLinear:
        """Best rank-K approximation of ``linear`` by truncated SVD (exact at full rank)."""
        weight = linear.weight
        spec = spec if spec is not None else spectrum(weight)
        return cls.from_factors(*truncate(spec, rank, weight.dtype), linear.bias)

    def truncated(self, rank: int, spec: Spectrum | None = None) -> FactoredLinear:
        """A new FactoredLinear of a lower rank, computed from the factors alone."""
        spec = spec if spec is not None else self.spectrum()
        return type(self).from_factors(*truncate(spec, rank, self.L.dtype), self.bias)

    @torch.no_grad()
    def load_factors(
        self, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        """Copy L, R (and bias, if this layer has one) in place."""
        self.L.copy_(left)
        self.R.copy_(right)
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)

    def spectrum(self) -> Spectrum:
        """Singular values and vectors of L R, from the factors alone."""
        return factored_spectrum(self.L, self.R)

    def dense_weight(self) -> torch.Tensor:
        """L R as an O x I tensor (for export and checks, not for the forward)."""
        return self.L @ self.R

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear with weight L R and the same bias."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.L.device,
            dtype=self.L.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.R), self.L, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
