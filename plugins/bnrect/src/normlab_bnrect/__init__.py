"""BN rectification (Benz, Zhang, Karjauv, Kweon, WACV 2021).

Before each test domain, replace the population statistics of the BN layers
with the statistics of ``n_samples`` unlabeled images of that domain (the first
of its adaptation samples, a fixed random draw over the whole domain: see
``adapt_samples``), evaluate, then restore the source statistics bit for bit.

The statistics are estimated layer by layer in one forward (``estimate:
layerwise``, the default): each BN's statistics are set from its input as the
input arrives, so every later layer sees the features the adapted model
produces. Benz et al.'s code instead runs one forward with the BNs in train
mode and writes the variant afterwards (``estimate: batch``); the two agree for
the full adaptation up to the ``n / (n - 1)`` variance factor used while
normalising, but for the mean-only, variance-only and prior variants the
batch form's deeper statistics describe features the evaluated model never
sees.

Variants: adapt only the mean or only the variance; only the front, middle or
end third of the BN layers (forward order) or the layers whose name starts
with one of ``layers``; mix with the source statistics with weight
``N / (N + n)`` (``prior: N``, Schneider et al., NeurIPS 2020), once per
domain from the ``n`` adaptation samples, or with ``per_batch: true`` on
every evaluated batch (their evaluation: ``n`` is then the batch size and
nothing is estimated before the domain's first batch). Only the BN
layers that the model actually runs for the domain are changed, so with routed
BN (AdvBN's auxiliary BN, dual BN) the route in use is rectified.

As in PyTorch's BatchNorm, the adapted ``running_var`` is the unbiased
variance of the batch (``n / (n - 1)`` times the biased one).

Adapting to every forward's own batch (``per_batch``, and any adaptive attack:
``ctx.adaptive``, docs/adaptive.md) is one code path, :func:`per_forward`: it
writes no buffer; a pre-hook on each chosen BN maps its input so that the BN's
eval-mode normalisation with the stored statistics equals normalisation with
the batch's (layer by layer, as above), through autograd, so an attacker's
gradient runs through the statistics.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re

import torch
import torch.nn.functional as F
from normlab import hookimpl
from normlab.errors import UsageError
from torch import nn

from .settings import Config

requires = ()
conflicts = ("nf",)
conflict_reasons = {"nf": "nf removes every BN layer, so there are no statistics to rectify"}
after = ("advbn", "condition", "slim")  # rectify the routes those plugins select


def layer_name(name: str) -> str:
    """The BN layer a BN module belongs to: its name without routes (``...bn1.norm.routes.1`` -> ``...bn1.norm``),
    so the copies a routed layer holds (AdvBN's main/aux, OAT's clean/adv, slim's widths) count as one layer."""
    return re.sub(r"(\.routes\.\d+)+", "", name)


def select(model: nn.Module, cfg: Config) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BN modules the settings choose, in forward (definition) order. ``part`` takes thirds of the
    network's BN layers (:func:`layer_name`: a routed layer's copies count once), so a third covers the
    same layers whatever route is in use."""
    bns = [(n, m) for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if cfg.layers is not None:
        bns = [(n, m) for n, m in bns if any(n.removeprefix("backbone.").startswith(p) for p in cfg.layers)]
    if cfg.part != "all":
        layers = list(dict.fromkeys(layer_name(n) for n, _ in bns))
        k = len(layers)
        lo, hi = {"front": (0, k // 3), "middle": (k // 3, 2 * k // 3), "end": (2 * k // 3, k)}[cfg.part]
        chosen = set(layers[lo:hi])
        bns = [(n, m) for n, m in bns if layer_name(n) in chosen]
    return bns


def reductions_faster(f: torch.Tensor) -> bool:
    """Whether two reductions (:func:`two_pass`) compute ``f``'s statistics faster than PyTorch's
    batch-norm kernel.

    On CPU that kernel reduces a contiguous (N, C, H, W) input 2.5-4x slower than a mean over
    (N, H, W) followed by a sum of squared deviations, once a sample has at least 16 values per
    channel (one thread, resnet18's BN inputs at 32x32, n = 32: 980 against 160 us at 16x16, 260
    against 70 at 8x8, 140 against 70 at 4x4; at 2x2 the two tie and at 1x1 the kernel wins).
    """
    return f.device.type == "cpu" and f.dim() > 2 and f.is_contiguous() and f.numel() >= 16 * f.shape[0] * f.shape[1]


def two_pass(f: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write the per-channel mean and unbiased variance of ``f`` (N, C, ...) into ``mean`` and ``var``:
    the mean, then the mean squared deviation from it (as stable as the batch-norm kernel)."""
    dims = [0, *range(2, f.dim())]
    torch.mean(f, dims, out=mean)
    d = f - mean.view(1, -1, *(1,) * (f.dim() - 2))
    torch.sum(d.mul_(d), dims, out=var).div_(f.numel() // f.shape[1] - 1)


def batch_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of a BN input (N, C, ...), as BatchNorm's running update.

    :func:`two_pass` where :func:`reductions_faster`; elsewhere PyTorch's own batch-norm kernel (a
    training-mode ``F.batch_norm`` with momentum 1 into fresh buffers, its output discarded): the
    values BatchNorm itself would store. ``torch.var_mean`` over (N, H, W) is 3x slower than either
    on CPU. Float32 under autocast.
    """
    f = f.detach().float()
    mean = torch.zeros(f.shape[1], device=f.device)
    var = torch.ones(f.shape[1], device=f.device)
    if reductions_faster(f):
        two_pass(f, mean, var)
    else:
        F.batch_norm(f, mean, var, training=True, momentum=1.0)
    return mean, var


def estimate_and_normalise(bn: nn.modules.batchnorm._BatchNorm, f: torch.Tensor) -> torch.Tensor:
    """Set ``bn``'s statistics to those of ``f`` and return its eval-mode output with them.

    Where :func:`reductions_faster`, :func:`two_pass` into the BN's buffers, then its eval-mode
    normalisation. Elsewhere one kernel: a training-mode ``F.batch_norm`` with momentum 1 stores the
    batch mean and the unbiased variance ``v_u = k v_b`` (``k = n / (n - 1)``, ``n`` values per
    channel) but normalises with the biased ``v_b``; the eval-mode output wanted,
    ``(f - m) / sqrt(v_u + eps) * w + b``, equals ``(f - m) / sqrt(v_b + eps / k) * (w / sqrt(k)) + b``,
    which that call computes when given ``eps / k`` and ``w / sqrt(k)``. Either way equal to
    :func:`batch_stats` followed by the BN's own eval forward up to float rounding, without the
    normalised output the kernel form of :func:`batch_stats` throws away (benchmarks/bnrect.py).
    Only for a plain ``_BatchNorm`` forward (no activation after it) and an input of the buffers' dtype.
    """
    if reductions_faster(f):
        two_pass(f, bn.running_mean, bn.running_var)
        return F.batch_norm(f, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    n = f.numel() // f.shape[1]
    k = n / (n - 1)
    weight = bn.weight / math.sqrt(k) if bn.weight is not None else f.new_full((f.shape[1],), 1 / math.sqrt(k))
    bn.running_mean.zero_()  # momentum 1 keeps 0 * old: zeroed first, so a non-finite old value cannot leak
    bn.running_var.zero_()
    return F.batch_norm(f, bn.running_mean, bn.running_var, weight, bn.bias, True, 1.0, bn.eps / k)


def target(mean: torch.Tensor, var: torch.Tensor, mean0: torch.Tensor, var0: torch.Tensor, n: int,
           cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics a BN evaluates with: the target batch's (``mean``, ``var`` from ``n`` samples),
    mixed with the source's (``mean0``, ``var0``) by ``prior``, the mean or the variance kept as the source's."""
    if cfg.prior is not None:
        w = cfg.prior / (cfg.prior + n)
        mean, var = w * mean0 + (1 - w) * mean, w * var0 + (1 - w) * var
    if cfg.adapt == "mean":
        var = var0
    elif cfg.adapt == "var":
        mean = mean0
    return mean, var


@torch.no_grad()
def rectify(model: nn.Module, samples: torch.Tensor, cfg: Config, ctx=None):
    """Re-estimate the chosen BN statistics from ``samples``; return (undo, layers changed, layers skipped, n).

    ``estimate: layerwise`` (default): one forward in eval mode; each chosen BN's forward, wrapped for
    that forward only, sets its statistics from its input as that input arrives (:func:`target`), so
    every BN normalises with the values it will evaluate with, and deeper layers see the features the
    adapted model produces. For the full adaptation (``adapt: both``, no ``prior``) a plain BN estimates
    and normalises without a discarded output (:func:`estimate_and_normalise`).
    ``estimate: batch``: Benz et al.'s code, one forward with the BNs in train mode (statistics reset,
    ``momentum=None``), the variant applied afterwards; for ``adapt: both`` without ``prior`` it differs
    from layerwise only in normalising with the biased variance during that forward, but for the
    mean-only, variance-only and prior variants deeper layers' statistics then describe features the
    evaluated model never produces.

    Layers that do not run (another route) and layers that see one value per channel (n = 1 at a
    1x1 feature map, where no variance exists) keep their source statistics.
    """
    bns = select(model, cfg)
    layerwise = cfg.estimate == "layerwise"
    # layerwise writes only the statistics; the batch estimate also counts batches and changes momentum
    saved = {n: (m.running_mean.clone(), m.running_var.clone(),
                 None if layerwise else m.num_batches_tracked.clone(), m.momentum) for n, m in bns}
    used: set[str] = set()
    skipped: set[str] = set()
    seen: set[str] = set()  # BNs estimated already (a module may run twice in the one forward)
    fuse = layerwise and cfg.adapt == "both" and cfg.prior is None

    def estimate(mod, name, plain, f):
        """The chosen BN's forward during the adaptation forward: estimate on its first input, then run."""
        if name in seen:
            return plain(f)
        seen.add(name)
        if f.numel() // f.shape[1] < 2:
            skipped.add(name)
            return plain(f)
        used.add(name)
        if not layerwise:
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average: after one batch, exactly its statistics
            mod.train()
            return plain(f)
        if fuse and plains[name][1] and f.dtype == mod.running_mean.dtype:
            return estimate_and_normalise(mod, f)
        mean0, var0, _, _ = saved[name]
        mean, var = target(*batch_stats(f), mean0, var0, f.shape[0], cfg)
        mod.running_mean.copy_(mean)
        mod.running_var.copy_(var)
        return plain(f)

    plains = {}  # name: (an instance-level forward to put back, whether the forward is _BatchNorm's own)
    for name, m in bns:
        plains[name] = (m.__dict__.get("forward"), type(m).forward is nn.modules.batchnorm._BatchNorm.forward)
        m.forward = functools.partial(estimate, m, name, m.forward)
        m.eval()

    def unwrap():
        for name, m in bns:
            if plains[name][0] is None:
                del m.forward
            else:
                m.forward = plains[name][0]

    def undo():
        for name, m in bns:
            mean0, var0, count0, momentum = saved[name]
            m.running_mean.copy_(mean0)
            m.running_var.copy_(var0)
            if count0 is not None:
                m.num_batches_tracked.copy_(count0)
                m.momentum = momentum
                m.eval()

    x = samples[: cfg.n_samples]
    try:
        with ctx.active() if ctx is not None else contextlib.nullcontext():
            model(x)
    except BaseException:
        unwrap()
        undo()
        raise
    unwrap()
    if not layerwise:  # back to eval mode and the BNs' own momentum, then the variant
        for name, m in bns:
            m.eval()
            mean0, var0, _, momentum = saved[name]
            m.momentum = momentum
            if name in used:
                mean, var = target(m.running_mean.clone(), m.running_var.clone(), mean0, var0, x.shape[0], cfg)
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
    return undo, sorted(used), sorted(skipped), x.shape[0]


def moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of a BN input (N, C, ...), differentiable (float32 for
    half-precision inputs)."""
    f = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
    var, mean = torch.var_mean(f, dim=[0, *range(2, f.dim())], correction=1)
    return mean, var


def per_forward(model: nn.Module, cfg: Config):
    """Adapt the chosen BNs to the input of every forward until ``undo()``; no buffer is written.

    A pre-hook maps each chosen BN's input ``f`` to ``(f - m) * sqrt((v0 + eps) / (v + eps)) + m0``,
    where ``(m, v)`` are the statistics the variant takes from this forward's ``f`` (:func:`target`)
    and ``(m0, v0)`` the stored ones: the BN's eval-mode output is then exactly (up to float
    rounding) its output with statistics ``(m, v)``, and differentiable through them. A BN that runs
    twice in one forward keeps the statistics of its first input; one value per channel keeps the
    stored statistics, as in :func:`rectify`.
    """
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def adapt(mod, inputs, name):
        f = inputs[0]
        if f.numel() // f.shape[1] < 2:
            return None
        if name not in seen:
            seen[name] = target(*moments(f), mod.running_mean, mod.running_var, f.shape[0], cfg)
        mean, var = seen[name]
        shape = (1, -1) + (1,) * (f.dim() - 2)
        scale = ((mod.running_var + mod.eps) / (var + mod.eps)).sqrt()
        return ((f - mean.view(shape)) * scale.view(shape) + mod.running_mean.view(shape), *inputs[1:])

    hooks = [m.register_forward_pre_hook(lambda mod, i, name=n: adapt(mod, i, name)) for n, m in select(model, cfg)]
    hooks.append(model.register_forward_pre_hook(lambda *_: seen.clear()))

    def undo():
        for h in hooks:
            h.remove()

    return undo


@hookimpl
def on_model(model, run):
    """Refuse ``n_samples`` above what each domain offers (the run's ``adapt_samples``) and ``layers`` that
    name no BN layer, before training."""
    cfg = run.plugin_config("bnrect")
    if not cfg.per_batch and cfg.n_samples > run.config.adapt_samples:
        raise UsageError(f"{run.source}: plugins.bnrect.n_samples: expected at most adapt_samples "
                         f"({run.config.adapt_samples}), the unlabeled samples each domain offers; got "
                         f"{cfg.n_samples} (raise adapt_samples at the top level of the run file)")
    if cfg.layers is not None:
        names = [n.removeprefix("backbone.") for n, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        unknown = [p for p in cfg.layers if not any(n.startswith(p) for n in names)]
        if unknown:
            raise UsageError(f"{run.source}: plugins.bnrect.layers: expected prefixes of the backbone's BN layer "
                             f"names (e.g. {', '.join(names[:3])}); no BN layer starts with {unknown[0]!r}")


@hookimpl
def on_domain(model, domain, samples, ctx):
    cfg = ctx.run.plugin_config("bnrect")
    if not any(domain.startswith(p) for p in cfg.domains):
        return None
    if ctx.adaptive:  # an adaptive attack's forward: adapt to its own batch, through autograd
        return per_forward(model, cfg)
    if cfg.per_batch:
        layers = {layer_name(n) for n, _ in select(model, cfg)}  # the route in use runs one copy of each
        ctx.run.state.setdefault("bnrect", {})[domain] = {"n_samples": "each evaluated batch", "bn_layers": len(layers)}
        return per_forward(model, cfg)
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
