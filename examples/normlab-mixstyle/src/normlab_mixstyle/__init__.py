"""An example third-party normlab plugin: MixStyle (Zhou, Yang, Qiao, Xiang; ICLR 2021).

During training, with probability ``p`` per batch, the per-sample, per-channel mean and standard
deviation of a layer's output are mixed with those of another sample of the batch:

    out = (x - mu) / sigma * (lam * sigma + (1 - lam) * sigma[perm]) + lam * mu + (1 - lam) * mu[perm]

with ``lam ~ Beta(alpha, alpha)`` per sample and ``perm`` a random permutation; the statistics are
treated as constants (no gradient through them), as in the paper. It shows the parts of normlab's
public surface a feature-level plugin needs (docs/plugins.md):

- ``on_model`` asks for the layer with ``run.request_feature(layer, key="layers")``;
- ``on_feature`` receives every requested layer (other plugins' too): it checks ``name``;
- it acts only in the host's training forward: ``ctx.training`` and not ``ctx.inner`` (the
  forwards of an attack, pgd's or advbn's, have ``ctx.inner`` set);
- a bad setting is a ``UsageError`` starting with ``run.source`` and the key, so the user gets one
  line and exit status 2;
- ``run.state`` keeps per-run scratch (here: how many feature maps were mixed).

Enable it with ``plugins: {mixstyle: {layers: [layer1, layer2]}}``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from normlab import UsageError, hookimpl

NAME = "mixstyle"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[str] = Field(default_factory=lambda: ["layer1"], min_length=1,
                              description="backbone layers whose outputs are mixed")
    p: float = Field(0.5, ge=0, le=1, description="probability that a training batch is mixed")
    alpha: float = Field(0.1, gt=0, description="Beta(alpha, alpha) distribution of the mixing weight")
    eps: float = Field(1e-6, gt=0, description="added to the variance before the square root")


def mix(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, eps: float) -> torch.Tensor:
    """MixStyle of ``x`` (N, C, H, W) with weights ``lam`` (N,) and partner indices ``perm`` (N,)."""
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sigma = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    lam = lam.to(x.dtype).view(-1, 1, 1, 1)
    mixed_mu = lam * mu + (1 - lam) * mu[perm]
    mixed_sigma = lam * sigma + (1 - lam) * sigma[perm]
    return (x - mu) / sigma * mixed_sigma + mixed_mu


@hookimpl
def on_model(model, run):
    cfg: Config = run.plugin_config(NAME)
    names = dict(model.named_modules())
    for layer in cfg.layers:
        if layer not in names:
            raise UsageError(f"{run.source}: plugins.{NAME}.layers: {run.config.model.name} has no layer "
                             f"{layer!r}")
        run.request_feature(layer, key="layers")
    run.state[NAME] = {"mixed": 0}


@hookimpl
def on_feature(name, feature, ctx):
    cfg: Config = ctx.run.plugin_config(NAME)
    if name not in cfg.layers or not ctx.training or ctx.inner or feature.shape[0] < 2:
        return None
    if torch.rand(()) >= cfg.p:
        return None
    n = feature.shape[0]
    lam = torch.distributions.Beta(cfg.alpha, cfg.alpha).sample((n,)).to(feature.device)
    perm = torch.randperm(n, device=feature.device)
    ctx.run.state[NAME]["mixed"] += 1
    return mix(feature, lam, perm, cfg.eps)


@hookimpl
def on_eval(model, ctx, report):
    report.add(f"{NAME}/mixed", float(ctx.run.state[NAME]["mixed"]))
