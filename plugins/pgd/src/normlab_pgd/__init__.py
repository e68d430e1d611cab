"""PGD adversarial training, lambda-weighted per sample (Madry et al. 2018; OAT; NoFrost), TRADES optional.

Loss ``(1 - lam) CE(x) + lam CE(x_adv)``, with ``lam`` per sample from
``ctx.lam`` (the ``condition`` plugin sets it) or else the ``lam`` setting.
``x_adv`` is torchattacks' PGD (Linf) or PGDL2 (L2) with a random start, made
on [0, 1] inputs with the model in eval mode and parameter gradients off
(every module's mode and every ``requires_grad`` flag restored afterwards, so
no BN statistic moves and frozen BNs stay frozen).

How the batch is used:

- *pure mode* (``combine: lam``, ``lam: 1``, no ``ctx.lam``, no ``ctx.adv_route``,
  no TRADES): ``on_batch`` replaces the attacked rows of ``batch.x`` by their
  adversarial examples, so the host's single forward is the adversarial one
  (Madry PGD-AT; no clean forward feeds clean statistics into the BNs).
- otherwise ``on_loss`` attacks the rows with ``lam != 0`` (among the attacked
  rows), forwards them once in train mode, reweights ``ce`` by ``1 - lam`` and
  adds ``adv`` (per-sample CE zero-padded to the batch length) with weight
  ``lam``: the total is ``mean((1 - lam) CE + lam CE_adv)`` over the batch, as
  in the public OAT code.
- ``combine: mean`` weighs every view equally: with B host rows (clean and, in
  NoFrost*, AugMix views) and M attacked rows, ``ce`` gets ``B / (B + M)`` and
  ``adv`` (not padded) ``M / (B + M)``; with V = B / M views that is
  ``V / (V + 1)`` and ``1 / (V + 1)``.
- ``trades``: torchattacks' TPGD (Linf, KL attack) makes ``x_adv``; ``ce`` is
  kept and the term ``trades`` is the per-sample ``KL(p(x) || p(x_adv))`` over
  the attacked rows with weight ``beta`` (Zhang et al. 2019).

``attack_rows: clean`` attacks rows ``[:batch.extra["n_clean"]]`` (the clean
rows of an AugMix batch; every row when there is no ``n_clean``); ``all``
attacks every row.

The attack and the adversarial forward run under
``ctx.subset(rows).using(route=ctx.adv_route)`` (the route only when
``adv_route`` is set), so routed BNs and FiLM see the attacked rows' fields.

Precision: attacks are generated in fp32 (autocast off inside the attack, also
under the host's bf16 autocast on CUDA), so the sign of small input gradients
is not lost to bf16 rounding; the adversarial training forward runs under the
host's autocast like the clean one.

Randomness: the random start is drawn from a torch RNG seeded from the run's
seed and the global step, inside a forked RNG, so a run reproduces bitwise and
the data order does not depend on whether attacks run.

``steps: 0`` or ``eps: 0`` means no attack (``x_adv = x``, no random start).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from normlab import hookimpl
from normlab.errors import UsageError
from normlab.evals.attacks import attack_mode, seeded
from normlab.layers import folded_if_exact

from .settings import Config

requires = ()
conflicts = ()
conflict_reasons: dict[str, str] = {}
after = ("condition",)  # condition sets ctx.lam and ctx.adv_route in its on_batch; pgd reads them
knobs = ()


def attack_seed(run, step: int) -> int:
    """The seed of one step's attack randomness: the run's seed and the global step."""
    seed = int(getattr(getattr(run, "config", None), "seed", 0) or 0)
    return (seed * 1_000_003 + int(step) * 7_919 + 0x5D9) % 2**63


def make_attack(model: torch.nn.Module, cfg: Config, device: torch.device):
    """The torchattacks attack the settings name (PGD, PGDL2 or TPGD)."""
    import torchattacks

    if cfg.trades:
        atk = torchattacks.TPGD(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps)
    elif cfg.norm == "Linf":
        atk = torchattacks.PGD(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                               random_start=cfg.random_start)
    else:
        atk = torchattacks.PGDL2(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                                 random_start=cfg.random_start)
    atk.set_device(device)  # torchattacks guesses it from the first parameter
    return atk


def adversarial(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx, cfg: Config) -> torch.Tensor:
    """Adversarial examples for rows ``x`` under ``ctx`` (the rows' context, made active here).

    Eval mode, parameter gradients off (modes and flags restored), autocast
    off (fp32), randomness seeded from the run and ``ctx.step``. With ``fold``
    (the default) every eval-mode BN the attack's route selects is folded into
    its convolution for the attack (:func:`normlab.layers.folded_if_exact`: exact
    up to float rounding, checked once per run; per-sample routes and hooked BNs
    are left as they are), in the run's memory format (``train.channels_last``;
    a layout: the same numbers up to float rounding).
    """
    if cfg.steps == 0 or cfg.eps == 0:
        return x.detach()
    with seeded(x.device, attack_seed(ctx.run, ctx.step)), attack_mode(model), \
            torch.autocast(x.device.type, enabled=False), ctx.using(inner=True):
        fold, images = contextlib.nullcontext(), x.detach().float()
        if cfg.fold:
            fold = folded_if_exact(getattr(ctx.run, "state", {}).setdefault("pgd", {}), [model],
                                   lambda: model(images), lambda msg: ctx.run.log.warning("pgd: %s", msg),
                                   channels_last=getattr(ctx.run, "channels_last", False))
        with fold:
            x_adv = make_attack(model, cfg, x.device)(images, y)
    return x_adv.detach().to(x.dtype)


def rows_context(ctx, rows):
    """The context of a forward of ``rows``: per-sample fields selected, the adversarial route set."""
    sub = ctx.subset(rows)
    return dataclasses.replace(sub, route=ctx.adv_route) if ctx.adv_route is not None else sub


def _n_attacked(batch, cfg: Config) -> int:
    n = batch.y.shape[0]
    return n if cfg.attack_rows == "all" else int(batch.extra.get("n_clean", n))


def _pure(cfg: Config, ctx) -> bool:
    return (cfg.combine == "lam" and cfg.lam == 1.0 and not cfg.trades and ctx.lam is None
            and ctx.adv_route is None and getattr(ctx, "passes", None) is None)


def _lam_rows(ctx, cfg: Config, n_rows: int, n_attacked: int, device) -> torch.Tensor:
    """Per-sample lambda (n_rows,): ctx.lam (or the setting) on the attacked rows, 0 elsewhere."""
    if ctx.lam is None:
        lam = torch.full((n_rows,), cfg.lam, device=device)
    else:
        lam = torch.as_tensor(ctx.lam, device=device).float().flatten()
        if lam.numel() == 1:
            lam = lam.expand(n_rows)
        elif lam.numel() != n_rows:
            raise ValueError(f"ctx.lam has {lam.numel()} rows for a batch of {n_rows}")
    if n_attacked < n_rows:
        lam = torch.cat([lam[:n_attacked], lam.new_zeros(n_rows - n_attacked)])
    return lam


# --- hooks ----------------------------------------------------------------------

@hookimpl
def on_model(model, run):
    cfg = run.plugin_config("pgd")
    if "condition" in run.enabled:
        if cfg.trades:
            raise UsageError(f"{run.source}: plugins.pgd.trades: expected false: plugin 'condition' sets a "
                             "per-sample lambda, and TRADES with a per-sample lambda is not defined")
        if cfg.combine != "lam":
            raise UsageError(f"{run.source}: plugins.pgd.combine: expected 'lam': plugin 'condition' sets a "
                             "per-sample lambda, which combine 'mean' would ignore")
    return None


@hookimpl
def on_batch(batch, ctx):
    """Pure mode: the attacked rows of the batch become adversarial before the host's forward."""
    cfg = ctx.run.plugin_config("pgd")
    if not _pure(cfg, ctx):
        return None
    n, total = _n_attacked(batch, cfg), batch.y.shape[0]
    rows = slice(0, n)
    x_adv = adversarial(ctx.run.model, batch.x[rows], batch.y[rows], rows_context(ctx, rows), cfg)
    batch.x = x_adv if n == total else torch.cat([x_adv, batch.x[n:]])
    ctx.state["pgd"] = {"pure": True, "attacked": n}
    return batch


@hookimpl
def on_loss(batch, model, ctx, terms):
    cfg = ctx.run.plugin_config("pgd")
    if ctx.state.get("pgd", {}).get("pure"):
        return
    total, n = batch.y.shape[0], _n_attacked(batch, cfg)
    device = batch.y.device
    if cfg.combine == "lam" and not cfg.trades:
        lam = _lam_rows(ctx, cfg, total, n, device)
        idx = (lam != 0).nonzero().flatten()
    else:
        if ctx.lam is not None:
            raise UsageError(f"{ctx.run.source}: plugins.pgd: expected no per-sample lambda (ctx.lam) with "
                             f"{'trades' if cfg.trades else 'combine: mean'}")
        idx = torch.arange(n, device=device)
    m = idx.numel()
    if m == 0 and (cfg.combine == "mean" or cfg.trades):  # no rows to attack (n_clean is 0)
        return
    if m == 0:  # every lambda is 0: plain CE; the term stays (all weights 0) so the logged columns do not change
        if getattr(ctx.run, "shard", (0, 1))[1] > 1:  # other processes forward their rows: join synchronised BNs
            with rows_context(ctx, idx).active():
                model(batch.x[:0])
        terms.reweight("ce", 1 - lam)
        terms.add("adv", terms["ce"].detach().float().new_zeros(total), lam)
        return
    sub = rows_context(ctx, idx)
    x, y = batch.x[idx], batch.y[idx]
    x_adv = adversarial(model, x, y, sub, cfg)
    with sub.active():
        logits_adv = model(x_adv).float()
    if cfg.trades:
        clean = batch.logits[idx].float()
        kl = (F.softmax(clean, 1) * (F.log_softmax(clean, 1) - F.log_softmax(logits_adv, 1))).sum(1)
        terms.add("trades", kl, cfg.beta)
        return
    ce_adv = F.cross_entropy(logits_adv, y, reduction="none", label_smoothing=ctx.run.config.train.label_smoothing)
    if cfg.combine == "mean":
        terms.reweight("ce", total / (total + m))
        terms.add("adv", ce_adv, m / (total + m))
        return
    padded = ce_adv.new_zeros(total).index_copy(0, idx, ce_adv)
    terms.reweight("ce", 1 - lam)
    terms.add("adv", padded, lam)
