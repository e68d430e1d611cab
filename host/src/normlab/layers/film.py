"""Feature-wise linear modulation conditioned on the context's ``condition``."""

from __future__ import annotations

import torch
from torch import nn

from ..context import current

__all__ = ["FiLM"]


class FiLM(nn.Module):
    """Per-channel ``(1 + scale(c)) * x + shift(c)``, with ``c = current().condition``.

    ``scale`` and ``shift`` are two-layer MLPs over the (N, cond_dim) condition;
    their last layers start at zero, so a fresh FiLM is the identity. With no
    condition in the context (None) FiLM is the identity too. A one-row
    condition applies to every sample.
    """

    def __init__(self, num_features: int, cond_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cond_dim
        self.scale = self._mlp(cond_dim, hidden, num_features)
        self.shift = self._mlp(cond_dim, hidden, num_features)

    @staticmethod
    def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
        mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))
        nn.init.zeros_(mlp[2].weight)
        nn.init.zeros_(mlp[2].bias)
        return mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = current().condition
        if c is None:
            return x
        if c.shape[0] not in (1, x.shape[0]):  # one row (a test-time knob) applies to the whole batch
            raise ValueError(f"FiLM: condition has {c.shape[0]} rows for a batch of {x.shape[0]}")
        c = c.to(dtype=self.scale[0].weight.dtype)
        scale = self.scale(c).to(x.dtype)[:, :, None, None]
        shift = self.shift(c).to(x.dtype)[:, :, None, None]
        return x * (1 + scale) + shift
