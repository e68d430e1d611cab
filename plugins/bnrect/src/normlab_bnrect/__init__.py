"""BN rectification (Benz, Zhang, Karjauv, Kweon, WACV 2021).

Before each test domain, replace the population statistics of the BN layers
with the statistics of ``n_samples`` unlabeled images of that domain (one
batch, cumulative average: ``momentum=None`` after resetting the counters),
evaluate, then restore the source statistics bit for bit.

Variants: adapt only the mean or only the variance; only the front, middle or
end third of the BN layers (forward order) or the layers whose name starts
with one of ``layers``; mix with the source statistics with weight
``N / (N + n)`` (``prior: N``, Schneider et al., NeurIPS 2020). Only the BN
layers that the model actually runs for the domain are changed, so with routed
BN (AdvBN's auxiliary BN, dual BN) the route in use is rectified.

As in PyTorch's BatchNorm, the adapted ``running_var`` is the unbiased
variance of the batch (``n / (n - 1)`` times the biased one).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from normlab import hookimpl
from normlab.errors import UsageError

requires = ()
conflicts = ("nf",)
conflict_reasons = {"nf": "nf removes every BN layer, so there are no statistics to rectify"}
after = ("advbn", "condition", "slim")  # rectify the routes those plugins select


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(32, ge=1, description="unlabeled samples per domain (one batch)")
    adapt: Literal["both", "mean", "var"] = Field("both", description="which statistics to re-estimate")
    part: Literal["all", "front", "middle", "end"] = Field("all", description="which third of the BN layers")
    layers: list[str] | None = Field(None, description="only BN layers whose name starts with one of these")
    prior: float | None = Field(None, ge=0, description="N: mix source statistics with weight N / (N + n)")
    domains: list[str] = Field(
        default_factory=lambda: ["corruptions/", "style/"],
        description="domain-name prefixes to adapt to (the clean source domain is not adapted by default)")


def select(model: nn.Module, cfg: Config) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BN layers the settings choose, in forward (definition) order."""
    bns = [(n, m) for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if cfg.layers is not None:
        bns = [(n, m) for n, m in bns if any(n.removeprefix("backbone.").startswith(p) for p in cfg.layers)]
    if cfg.part != "all":
        k = len(bns)
        lo, hi = {"front": (0, k // 3), "middle": (k // 3, 2 * k // 3), "end": (2 * k // 3, k)}[cfg.part]
        bns = bns[lo:hi]
    return bns


@torch.no_grad()
def rectify(model: nn.Module, samples: torch.Tensor, cfg: Config, ctx=None):
    """Re-estimate the chosen BN statistics from ``samples``; return (undo, layers changed, layers skipped, n).

    A BN layer is switched to estimation (statistics reset, ``momentum=None``,
    train mode) by a pre-hook when its input arrives, so layers that do not run
    (another route) and layers that see a single value per channel (n = 1 at a
    1x1 feature map, where no variance exists) keep their source statistics
    and normalize with them during the adaptation forward.
    """
    bns = select(model, cfg)
    saved = {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for n, m in bns}
    used: set[str] = set()
    skipped: set[str] = set()

    def start(mod, inputs, name):
        if name in used or name in skipped:
            return
        f = inputs[0]
        if f.numel() // f.shape[1] < 2:
            skipped.add(name)
            return
        mod.reset_running_stats()
        mod.momentum = None  # cumulative average: after one batch, exactly its statistics
        mod.train()
        used.add(name)

    hooks = [m.register_forward_pre_hook(lambda mod, i, name=n: start(mod, i, name)) for n, m in bns]
    for _, m in bns:
        m.eval()
    x = samples[: cfg.n_samples]
    try:
        if ctx is not None:
            with ctx.active():
                model(x)
        else:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for _, m in bns:
            m.eval()
    n = x.shape[0]
    for name, m in bns:
        mean0, var0, count0, momentum = saved[name]
        m.momentum = momentum
        if name not in used:  # not run (another route) or skipped: never reset
            continue
        if cfg.prior is not None:
            w = cfg.prior / (cfg.prior + n)
            m.running_mean.mul_(1 - w).add_(w * mean0)
            m.running_var.mul_(1 - w).add_(w * var0)
        if cfg.adapt == "mean":
            m.running_var.copy_(var0)
        elif cfg.adapt == "var":
            m.running_mean.copy_(mean0)

    def undo():
        for name, m in bns:
            mean0, var0, count0, momentum = saved[name]
            m.running_mean.copy_(mean0)
            m.running_var.copy_(var0)
            m.num_batches_tracked.copy_(count0)
            m.momentum = momentum

    return undo, sorted(used), sorted(skipped), n


@hookimpl
def on_model(model, run):
    """Refuse ``n_samples`` above what each domain offers (the run's ``adapt_samples``), before training."""
    cfg = run.plugin_config("bnrect")
    if cfg.n_samples > run.config.adapt_samples:
        raise UsageError(f"{run.source}: plugins.bnrect.n_samples: expected at most adapt_samples "
                         f"({run.config.adapt_samples}), the unlabeled samples each domain offers; got "
                         f"{cfg.n_samples} (raise adapt_samples at the top level of the run file)")


@hookimpl
def on_domain(model, domain, samples, ctx):
    cfg = ctx.run.plugin_config("bnrect")
    if not any(domain.startswith(p) for p in cfg.domains):
        return None
    undo, used, skipped, n = rectify(model, samples, cfg, ctx)
    ctx.run.log.debug("bnrect: %s: %d BN layers from %d samples", domain, len(used), n)
    record = {"n_samples": n, "bn_layers": len(used)}
    if skipped:
        record["skipped_one_value_per_channel"] = len(skipped)
    ctx.run.state.setdefault("bnrect", {})[domain] = record
    return undo


@hookimpl
def on_eval(model, ctx, report):
    """Record, per domain, how many samples and BN layers were adapted (labels are never read)."""
    domains = ctx.run.state.get("bnrect", {})
    if domains:
        report.records["bnrect"] = {
            "samples": "the first n_samples of each domain's adaptation samples (records.adaptation: a fixed "
                       "random draw over the whole domain)",
            "domains": domains,
        }
