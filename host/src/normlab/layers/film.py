"""Feature-wise linear modulation conditioned on the context's ``condition``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..context import Context, current

__all__ = ["FiLM"]


class FiLM(nn.Module):
    """Per-channel ``x * a(c) + b(c)``, with ``c = current().condition``; two forms (``style``).

    - ``normlab``: ``a = 1 + scale(c)``, ``b = shift(c)``, ``scale`` and ``shift`` two ReLU MLPs
      ``d -> hidden -> C`` whose last layers start at zero, so a fresh FiLM is the identity.
    - ``oat``: the OAT code's ``FiLM_Layer``: one MLP ``d -> hidden -> 2C`` (``hidden`` default
      ``2C``) with a leaky ReLU, its output split into ``(mu, sigma)``, each through a leaky ReLU;
      ``a = mu``, ``b = sigma``, PyTorch's default initialisation.

    With no condition in the context (None) FiLM is the identity. A one-row condition applies
    to every sample.

    A batch's condition usually repeats a few rows (OAT: one encoding per sampled lambda), so the
    MLPs run once per distinct row, found once per condition tensor and shared by every FiLM layer
    through ``ctx.state``, and the result is gathered per sample. A condition that needs gradients
    takes the plain per-row path.
    """

    def __init__(self, num_features: int, cond_dim: int, hidden: int | None = None, style: str = "normlab"):
        super().__init__()
        if style not in ("normlab", "oat"):
            raise ValueError(f"FiLM style must be 'normlab' or 'oat', got {style!r}")
        self.num_features, self.style = num_features, style
        if style == "oat":
            hidden = hidden or 2 * num_features
            self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.LeakyReLU(inplace=True),
                                     nn.Linear(hidden, 2 * num_features))
        else:
            hidden = hidden or cond_dim
            self.scale = self._mlp(cond_dim, hidden, num_features)
            self.shift = self._mlp(cond_dim, hidden, num_features)

    @staticmethod
    def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
        mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))
        nn.init.zeros_(mlp[2].weight)
        nn.init.zeros_(mlp[2].bias)
        return mlp

    def _ab(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.style == "oat":
            mu, sigma = F.leaky_relu(self.mlp(rows)).split(self.num_features, dim=-1)
            return mu, sigma
        return 1 + self.scale(rows), self.shift(rows)

    def coefficients(self, n: int, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-sample ``(a, b)``, each (n or 1, C), of ``x * a + b`` for the active condition; None without one.

        ``channels`` below ``num_features`` keeps the first ones (a slimmable network at a narrower width
        uses its first channels, and FiLM the coefficients of those)."""
        ctx = current()
        c = ctx.condition
        if c is None:
            return None
        if c.shape[0] not in (1, n):  # one row (a test-time knob) applies to the whole batch
            raise ValueError(f"FiLM: condition has {c.shape[0]} rows for a batch of {n}")
        rows, inverse = _distinct_rows(ctx, c)
        a, b = self._ab(rows.to(dtype=next(self.parameters()).dtype))
        if channels is not None and channels != self.num_features:
            a, b = a[:, :channels], b[:, :channels]
        if inverse is not None:
            a, b = a[inverse], b[inverse]
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coef = self.coefficients(x.shape[0], x.shape[1])
        if coef is None:
            return x
        a, b = coef
        return torch.addcmul(b.to(x.dtype)[:, :, None, None], x, a.to(x.dtype)[:, :, None, None])


def _distinct_rows(ctx: Context, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(distinct rows, per-sample index into them), or (c, None) where that saves nothing."""
    if c.shape[0] == 1 or c.requires_grad:
        return c, None
    hit = ctx.state.get("film.rows")
    if hit is not None and hit[0] is c and hit[1] == c._version:
        return hit[2], hit[3]
    rows, inverse = torch.unique(c, dim=0, return_inverse=True)
    ctx.state["film.rows"] = (c, c._version, rows, inverse)
    return rows, inverse
