"""Adversarial batch normalization (Shu, Wu, Goldblum, Goldstein, NeurIPS 2021).

The model is split after ``layer`` into a front g1 and a tail g2. For the
features ``f = g1(x)`` of a training batch, with ``mu`` the per-channel mean
over the whole batch (N, H, W), the adversarial features are

    f_adv = (f - mu) * d_sigma + mu * d_mu

with one (1, C, 1, 1) multiplier pair per batch, starting at 1. ``steps``
sign-gradient ascent steps on CE(g2(f_adv)) follow, each
``d <- clip(d + step_size * sign(grad_d), 1 - eps, 1 + eps)``, with the tail in
eval mode through its auxiliary BNs and no parameter gradients, as in the
public code. Where the split point follows a ReLU, f_adv is clamped at 0. The
training loss is ``CE(g2(f)) + weight * CE(g2(f_adv))``: the host's ``ce`` (the
clean forward through the main BNs) plus the term ``advbn`` (a train-mode
forward of f_adv through the auxiliary BNs). By default only the tail trains.

Efficiency: the front runs once per batch, inside the host's forward (it is
frozen and its input needs no gradient, so no graph is built there); the
attack repeats only the tail, on the detached feature.

Every BN in the tail becomes a ``RoutedNorm`` with routes ``main`` (the clean
BN) and ``aux`` (a copy of it, so a fine-tune starts the auxiliary BNs from the
trained clean statistics). At test time the knob ``route`` chooses ``main``,
``aux`` or ``auto``: per test domain, from that domain's unlabeled samples, the
route whose stored running statistics are closest to the statistics of the
features entering its BNs (symmetric KL between per-channel normals, averaged
over channels and layers; the divergence of the paper's section 5.3). An adaptive
attack (docs/adaptive.md) sees auto choose on every attacked batch and attacks
each route fixed (``on_choices``), keeping the worse.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from normlab import hookimpl
from normlab.errors import UsageError
from normlab.evals.attacks import attack_mode
from normlab.evals.divergence import symmetric_kl
from normlab.layers import RoutedNorm, Split, as_norm_act, folded_if_exact, split_points
from torch import nn

from .settings import Config

requires = ()
conflicts = ("nf", "condition")
conflict_reasons = {
    "nf": "nf removes every BN, so there is no auxiliary BN to add",
    "condition": "both route BN on ctx.route",
}
after = ()
knobs = ("route",)

ROUTES = ("main", "aux")
NAME = "advbn"


def _state(run) -> dict:
    return run.state.setdefault(NAME, {})


# --- the math ------------------------------------------------------------------------------------

def perturb(f: torch.Tensor, mu: torch.Tensor, d_sigma: torch.Tensor, d_mu: torch.Tensor,
            clamp: bool) -> torch.Tensor:
    """``(f - mu) * d_sigma + mu * d_mu``, clamped at 0 when the feature follows a ReLU."""
    out = (f - mu) * d_sigma + mu * d_mu
    return out.clamp_min(0) if clamp else out


def attack(tail, f: torch.Tensor, y: torch.Tensor, steps: int, step_size: float, eps: float,
           clamp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign-gradient ascent on the per-channel multipliers; returns (mu, d_sigma, d_mu), detached.

    ``tail`` maps features to logits; the caller chooses its mode and BN route.
    Statistics are over the whole of ``f`` (every row and position).
    """
    f = f.detach().float()
    mu = f.mean(dim=(0, 2, 3), keepdim=True)
    shape = (1, f.shape[1], 1, 1)
    d_sigma = torch.ones(shape, device=f.device, requires_grad=True)
    d_mu = torch.ones(shape, device=f.device, requires_grad=True)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(tail(perturb(f, mu, d_sigma, d_mu, clamp)).float(), y)
            g_sigma, g_mu = torch.autograd.grad(loss, (d_sigma, d_mu))
            with torch.no_grad():
                d_sigma.add_(g_sigma.sign(), alpha=step_size).clamp_(1 - eps, 1 + eps)
                d_mu.add_(g_mu.sign(), alpha=step_size).clamp_(1 - eps, 1 + eps)
    return mu, d_sigma.detach(), d_mu.detach()


def adversarial_features(model, split: Split, f: torch.Tensor, y: torch.Tensor, cfg: Config, clamp: bool, ctx):
    """The attacked features: tail in eval mode through the aux BNs, no parameter gradients.

    With ``fold`` (the default) the tail's eval-mode BNs are folded into their convolutions for the
    attack's forwards and backwards (:func:`normlab.layers.folded_if_exact`: exact up to float rounding,
    checked against the plain tail on the first batch; the training forwards never fold), and the
    attack's convolutions use the run's memory format (``train.channels_last``; a layout: the same numbers up to
    float rounding).
    """
    with attack_mode(model), ctx.using(route="aux", perturb=True, inner=True):
        fold = contextlib.nullcontext()
        if cfg.fold:
            fold = folded_if_exact(_state(ctx.run), split.tail_modules(), lambda: split.tail(f[:8].detach().float()),
                                   lambda msg: ctx.run.log.warning("advbn: %s", msg),
                                   channels_last=getattr(ctx.run, "channels_last", False))
        with fold:
            mu, d_sigma, d_mu = attack(split.tail, f, y, cfg.steps, cfg.step_size, cfg.eps, clamp)
    return perturb(f.detach().float(), mu, d_sigma, d_mu, clamp)


# --- building ----------------------------------------------------------------------------------------

def _split(backbone: nn.Module, layer: str, source: str) -> Split:
    try:
        points = split_points(backbone)
    except ValueError as e:
        raise UsageError(f"{source}: model.name: advbn {e}") from None
    if layer not in points:
        raise UsageError(f"{source}: plugins.advbn.layer: expected one of {', '.join(points)}; got {layer!r}")
    return Split(backbone, layer)


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@hookimpl
def on_model(model, run):
    cfg: Config = run.plugin_config(NAME)
    split = _split(model, cfg.layer, run.source)
    params = [n for n, _ in model.named_parameters()]
    tail = [p for p in split.tail_prefixes() if any(_under(n, [p]) for n in params)]
    st = _state(run)
    st.update(layer=cfg.layer, tail=split.tail_prefixes(), clamp=None if cfg.clamp == "auto" else cfg.clamp)
    run.request_feature(cfg.layer, key="layer")
    if cfg.train == "tail":
        run.train_only(tail)
    return None


@hookimpl
def on_batch_norm(name, module, model, run):
    if not _under(name, _state(run)["tail"]):
        return None
    wrapped = as_norm_act(module)
    wrapped.norm = RoutedNorm.copies(wrapped.norm, ROUTES)
    return wrapped


# --- training ----------------------------------------------------------------------------------------

@hookimpl
def on_feature(name, feature, ctx):
    # the host forward's front output (the front runs once per batch); not an inner loop's (pgd's attack
    # in its on_batch forwards the batch before the host does)
    if ctx.training and not ctx.inner and NAME not in ctx.state and name == _state(ctx.run).get("layer"):
        ctx.state[NAME] = feature
    return None


def _model_split(model, run) -> Split:
    st = _state(run)
    split = st.get("split")
    if split is None or split.model is not model:
        split = st["split"] = Split(model, st["layer"])
    return split


@hookimpl
def on_loss(batch, model, ctx, terms):
    run = ctx.run
    cfg: Config = run.plugin_config(NAME)
    f = ctx.state.get(NAME)
    if f is None:
        return
    st = _state(run)
    n = batch.extra.get("n_clean", f.shape[0]) if cfg.samples == "clean" else f.shape[0]
    f, y = f.detach()[:n], batch.y[:n]
    if st["clamp"] is None:  # auto: decided once, from the first batch
        st["clamp"] = bool((f >= 0).all())
        run.log.info("advbn: clamp f_adv at 0: %s (layer %s)", st["clamp"], cfg.layer)
    split = _model_split(model, run)
    f_adv = adversarial_features(model, split, f, y, cfg, st["clamp"], ctx)
    with ctx.using(route="aux", perturb=True):
        logits = split.tail(f_adv)
    loss = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=run.config.train.label_smoothing)
    terms.add(NAME, loss, cfg.weight)


# --- test time: the route knob --------------------------------------------------------------------------

def routed_norms(model: nn.Module) -> list[tuple[str, RoutedNorm]]:
    """The tail's main/aux RoutedNorms."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedNorm) and m.names == ROUTES]


@torch.no_grad()
def route_divergences(model: nn.Module, samples: torch.Tensor, ctx) -> dict[str, float]:
    """Per route: mean over the tail BNs of the symmetric KL between the per-channel normals of the
    features entering that route's BN (a forward through the route) and the BN's running statistics."""
    norms = routed_norms(model)
    out = {}
    for i, route in enumerate(ROUTES):
        divs = []

        def hook(bn, inputs):
            x = inputs[0].detach().double().transpose(0, 1).flatten(1)
            mean, var = x.mean(1), x.var(1, unbiased=False)
            # as the BN sees them: both variances plus its eps
            divs.append(symmetric_kl(mean, var + bn.eps, bn.running_mean.double(), bn.running_var.double() + bn.eps))

        handles = [m.routes[i].register_forward_pre_hook(hook) for _, m in norms]
        try:
            with ctx.using(route=route):
                model(samples)
        finally:
            for h in handles:
                h.remove()
        out[route] = float(torch.stack(divs).mean()) if divs else 0.0
    return out


def _wanted(ctx) -> str:
    """The route asked for: a value already in the context (a sweep over ``route``, an adaptive attack
    fixing it), else the settings'."""
    return ctx.route if ctx.route in (*ROUTES, "auto") else ctx.run.plugin_config(NAME).route


@hookimpl
def on_domain(model, domain, samples, ctx):
    old = ctx.route
    wanted = _wanted(ctx)
    if wanted == "auto":
        divs = route_divergences(model, samples, ctx)
        wanted = min(ROUTES, key=lambda r: divs[r])
        if not ctx.adaptive:  # an adaptive attack chooses on every forward: nothing per domain to record
            _state(ctx.run).setdefault("auto", {})[domain] = {"route": wanted, **{f"divergence_{r}": divs[r]
                                                                                    for r in ROUTES}}
    if wanted == old:
        return None
    ctx.route = wanted

    def restore():
        ctx.route = old

    return restore


@hookimpl
def on_choices(ctx):
    """``route: auto`` picks a route from the samples: an adaptive attack attacks each route fixed."""
    return {"route": list(ROUTES)} if _wanted(ctx) == "auto" else None


@hookimpl
def on_eval(model, ctx, report):
    """Record auto's choice per domain; with a sweep over main and aux, the share of domains where
    auto picked the better fixed route."""
    chosen = _state(ctx.run).get("auto")
    if not chosen:
        return
    record = {"rule": "per domain, the route with the smaller mean symmetric KL between the tail BN inputs' "
                      "per-channel normals and that route's running statistics",
              "domains": dict(chosen)}
    m = report.metrics
    agree = []
    for domain, c in chosen.items():
        accs = {r: m.get(f"sweep/route={r}/{domain}/acc") for r in ROUTES}
        if None not in accs.values() and accs["main"] != accs["aux"]:
            best = max(ROUTES, key=lambda r: accs[r])
            agree.append(c["route"] == best)
    report.add("advbn/auto/aux_share", sum(c["route"] == "aux" for c in chosen.values()) / len(chosen))
    if agree:
        report.add("advbn/auto/agrees_with_best", sum(agree) / len(agree))
        record["agrees_with_best"] = {"domains": len(agree), "agree": sum(agree)}
    report.records[NAME] = record
