"""Adversarial evaluators: torchattacks' attacks and the original AutoAttack.

Every evaluator here reports, on its own subset of the test split
(``n_examples``, ``batch_size``):

- ``<name>/acc``: robust accuracy, the fraction of images that are classified
  correctly *and* stay correct under the attack (the AutoAttack / RobustBench
  convention: only correctly classified images are attacked, so
  ``acc <= clean_acc`` always and ``eps: 0`` gives ``acc == clean_acc``);
- ``<name>/clean_acc``: accuracy on the same images without attack, computed
  the same way (fp32, no autocast);
- ``<name>/eps``: the perturbation budget that was used (attacks with one).

How the attacks run:

- Inputs are in [0, 1]; the model normalises internally, so ``eps`` and step
  sizes are in [0, 1] pixel units and no attack is told about mean/std.
- The model runs in eval mode (each module's own mode is restored afterwards)
  with its parameters' ``requires_grad`` switched off, so attacks compute input
  gradients only: no parameter ``.grad`` is filled (torchattacks' CW calls
  ``backward()``) and BN statistics cannot move. The model's buffers are
  compared bitwise before and after the attacks; a change is a RunFailure.
- The whole evaluator runs inside ``ctx.active()`` (plugin modules read the
  evaluation context: route, lambda, width) and inside
  ``run.domain("clean", ...)`` (test-time adaptation plugins adapt first and
  restore afterwards; attacks see the adapted model).
- ``adapt`` (every attack): ``static`` (default) attacks the model adapted once,
  as above; ``adaptive`` attacks a model that adapts to every batch it is given
  (the attacked batch is its own adaptation batch; gradients run through the
  adaptation, discrete choices are attacked one value at a time), with keys
  ``<name>/adaptive/...``; ``both`` runs the two. See :mod:`.adaptive` and
  docs/adaptive.md. ``eot: K`` (pgd, apgd, apgd_dlr, autoattack) averages each
  step's gradient over K forwards, for stochastic models.
- Randomness (PGD's random start, APGD, Square, AutoAttack) is seeded from the
  evaluator's ``seed`` or else the run's ``seed``, inside a forked RNG, so
  results repeat and later evaluators see the global RNG unchanged.
- Every adversarial batch is checked against its threat model (inside the
  eps-ball up to float rounding and inside [0, 1]); a violation is a
  RunFailure, never a number.

Default budgets (``eps: null``) are the usual threat models of each dataset:
Linf 0.3 / L2 2.0 on MNIST (Madry et al.; Croce & Hein), Linf 8/255 / L2 0.5 on
CIFAR-10/100 (RobustBench), Linf 4/255 / L2 3.0 on ImageFolder (ImageNet-style)
data. A standard (not adversarially trained) model is near 0% at these
budgets; set ``eps`` for a finer picture (e.g. ``--set evaluate.pgd.eps=0.1``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Literal

import torch
from tqdm.auto import tqdm

from ..errors import RunFailure
from . import Evaluator, test_loader
from .adaptive import Adaptive, fixings
from .settings import (APGDConfig, AttackSettings, AutoAttackConfig, CWConfig, FGSMConfig,
                       MIFGSMConfig, PGDConfig, SquareConfig)

__all__ = ["DEFAULT_EPS", "default_eps", "attack_mode", "seeded", "keep_trace"]

Norm = Literal["Linf", "L2"]

# the usual threat models per dataset: (Linf, L2) in [0, 1] pixel units
DEFAULT_EPS: dict[str, dict[str, float]] = {
    "mnist": {"Linf": 0.3, "L2": 2.0},
    "cifar10": {"Linf": 8 / 255, "L2": 0.5},
    "cifar100": {"Linf": 8 / 255, "L2": 0.5},
    "imagefolder": {"Linf": 4 / 255, "L2": 3.0},
}


def default_eps(dataset: str, norm: str) -> float:
    """The usual budget for ``dataset`` under ``norm`` (Linf or L2; see the module doc)."""
    return DEFAULT_EPS.get(dataset, DEFAULT_EPS["imagefolder"])[norm]


# --- the machinery shared by every attack -------------------------------------

@contextlib.contextmanager
def attack_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the block; each module's mode and flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's RNG streams."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def keep_trace() -> Iterator[None]:
    """pyautoattack's dynamic-defense check calls ``sys.settrace(None)``: give debuggers/coverage theirs back."""
    trace = sys.gettrace()
    try:
        yield
    finally:
        if sys.gettrace() is not trace:
            sys.settrace(trace)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _check_buffers(name: str, model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    changed = [n for n, b in model.named_buffers() if n not in before or not torch.equal(b, before[n])]
    if changed:
        raise RunFailure(f"evaluator {name!r}: the attack changed model buffers (BN statistics?): "
                         f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}")


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def _check_budget(name: str, x: torch.Tensor, x_adv: torch.Tensor, norm: str | None, eps: float | None) -> None:
    """Adversarial images must lie in [0, 1] and in the eps-ball (up to float rounding)."""
    if x_adv.shape != x.shape:
        raise RunFailure(f"evaluator {name!r}: the attack returned shape {tuple(x_adv.shape)} for {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise RunFailure(f"evaluator {name!r}: the attack returned non-finite images")
    lo, hi = x_adv.min().item(), x_adv.max().item()
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise RunFailure(f"evaluator {name!r}: adversarial images leave [0, 1] (range {lo:.6g} .. {hi:.6g})")
    if norm is None or eps is None:
        return
    d = (x_adv - x).flatten(1).float()
    size = {"Linf": lambda: d.abs().amax(1), "L2": lambda: d.norm(dim=1), "L1": lambda: d.abs().sum(1)}[norm]()
    worst = size.max().item() if size.numel() else 0.0
    if worst > eps * (1 + 1e-4) + 1e-6:
        raise RunFailure(f"evaluator {name!r}: a perturbation of {norm} size {worst:.6g} exceeds eps {eps:.6g}")


def _seed(run, cfg: AttackSettings) -> int:
    return int(cfg.seed if cfg.seed is not None else run.config.seed)


def _eps(run, cfg, norm: str) -> float:
    return float(cfg.eps) if cfg.eps is not None else default_eps(run.data.name, norm)


AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``build(model) -> attack``: an evaluator's attack on ``model`` (the model, or an adaptive view of it)
Build = Callable[[torch.nn.Module], AttackFn]


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _evaluate(name: str, model, ctx, cfg, build: Build, norm: str | None, eps: float | None,
              count_if: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              adaptive: bool = False) -> dict[str, Any]:
    """Attack the correctly classified images of the evaluator's subset; return per-image results.

    ``build(m)`` is called in attack mode and returns ``attack(x, y) -> x_adv`` on ``m``.
    ``count_if(x, x_adv)`` (per image, bool) can reject adversarial examples
    that exceed a budget the attack itself does not enforce (CW's ``eps``).

    Static: the model is adapted to the clean domain's samples for the whole evaluation.
    ``adaptive``: the judge is an :class:`~.adaptive.Adaptive` view (each forward adapts to its own
    batch: the clean prediction to the clean batch, each check to the adversarial batch of the
    correctly classified images). Its candidates, each from the same random state: the attack
    through the adaptation (one per combination of fixed discrete choices) and, when a plugin
    adapts, the static attack's images (a transfer from the model adapted once); per batch the
    candidate with the fewest images still right is kept.
    """
    run = ctx.run
    clean, robust_all, labels = [], [], []
    sizes: list[torch.Tensor] = []  # L2 sizes of the successful adversarial examples
    # the forked RNG covers the loader too: iterating a DataLoader draws from torch's global RNG
    with seeded(run.device, _seed(run, cfg)), attack_mode(model), ctx.active():
        loader = test_loader(run, cfg)
        samples, positions = run.domain_samples()

        def static():
            return run.domain("clean", samples, ctx, positions)

        if adaptive:
            judge = Adaptive(model, run)
            targets = [(_label(f), Adaptive(model, run, fixed=f) if f else judge, contextlib.nullcontext)
                       for f in fixings(run, ctx)]
            if run.adapts:
                targets.append(("transfer from static", model, static))
            domain = contextlib.nullcontext()
        else:
            judge, targets, domain = model, [("static", model, contextlib.nullcontext)], static()
        with domain:
            before = _buffers(model)
            attacks = [(label, build(m), entered) for label, m, entered in targets]
            kept = {label: [] for label, _, _ in targets}  # per candidate: robust per image, had it been kept
            for x, y in tqdm(loader, desc=name, leave=False, disable=run.quiet):
                x, y = run.to_device(x), y.to(run.device)
                correct = _predict(judge, x) == y
                robust = correct.clone()
                for v in kept.values():
                    v.append(correct.clone())
                idx = correct.nonzero().flatten()
                if idx.numel():
                    xc, yc = x[idx], y[idx]
                    worst, start = None, _rng_state(run.device)
                    for i, (label, attack, entered) in enumerate(attacks):
                        if i:
                            _set_rng_state(run.device, start)
                        with entered(), ctx.using(inner=True):
                            x_adv = attack(xc, yc).detach().to(xc.dtype)
                        if not i:
                            after = _rng_state(run.device)
                        _check_budget(name, xc, x_adv, norm, eps)
                        still = _predict(judge, x_adv) == yc
                        if count_if is not None:
                            still |= ~count_if(xc, x_adv)
                        kept[label][-1][idx] = still
                        if worst is None or int(still.sum()) < int(worst[1].sum()):
                            worst = x_adv, still
                    _set_rng_state(run.device, after)  # later batches draw as after one attack
                    x_adv, still = worst
                    robust[idx] = still
                    if not still.all():
                        sizes.append((x_adv[~still] - xc[~still]).flatten(1).float().norm(dim=1).cpu())
                clean.append(correct.cpu())
                robust_all.append(robust.cpu())
                labels.append(y.cpu())
            _check_buffers(name, model, before)
    return {"clean": torch.cat(clean), "robust": torch.cat(robust_all), "labels": torch.cat(labels),
            "l2": torch.cat(sizes) if sizes else torch.empty(0),
            "candidates": {k: float(torch.cat(v).double().mean()) for k, v in kept.items()}}


def _label(fixed: dict[str, Any]) -> str:
    return "through the adaptation" + "".join(f", {k}={v}" for k, v in fixed.items())


def _report(report, key: str, res: dict, eps: float | None) -> None:
    report.accuracy(f"{key}/acc", res["robust"], res["labels"])
    report.accuracy(f"{key}/clean_acc", res["clean"], res["labels"])
    if eps is not None:
        report.add(f"{key}/eps", eps)


def _modes(cfg: AttackSettings) -> list[tuple[str, bool]]:
    """(key suffix, adaptive) for each evaluation ``adapt`` asks for: ``("", False)`` is the static one."""
    return {"static": [("", False)], "adaptive": [("/adaptive", True)],
            "both": [("", False), ("/adaptive", True)]}[cfg.adapt]


def _run(name: str, model, ctx, report, cfg, build: Build, norm: str | None, eps: float | None,
         count_if=None, after: Callable[[str, dict], None] | None = None) -> None:
    """Evaluate and report under ``name`` (static) and/or ``name/adaptive``; ``after(key, res)`` adds more."""
    for suffix, adaptive in _modes(cfg):
        key = name + suffix
        res = _evaluate(key, model, ctx, cfg, build, norm, eps, count_if, adaptive)
        _report(report, key, res, eps)
        if getattr(cfg, "eot", None):
            report.add(f"{key}/eot", cfg.eot)
        if adaptive:  # what each candidate alone would have given; the kept one is the worst per batch
            report.records.setdefault("adaptive", {})[key] = {"candidates_acc": res["candidates"]}
        if after is not None:
            after(key, res)


def _torchattack(atk, device: torch.device) -> AttackFn:
    atk.set_device(device)  # torchattacks guesses the device from the first parameter
    return atk


# --- evaluators ---------------------------------------------------------------

def fgsm(model, ctx, report, cfg: FGSMConfig) -> None:
    import torchattacks

    eps = _eps(ctx.run, cfg, "Linf")
    _run("fgsm", model, ctx, report, cfg, lambda m: _torchattack(torchattacks.FGSM(m, eps=eps), ctx.run.device),
         "Linf", eps)


def pgd(model, ctx, report, cfg: PGDConfig) -> None:
    import torchattacks

    eps = _eps(ctx.run, cfg, cfg.norm)
    alpha = cfg.alpha if cfg.alpha is not None else 2.5 * eps / cfg.steps

    def build(m):
        if (cfg.eot or 1) > 1:
            atk = torchattacks.EOTPGD(m, eps=eps, alpha=alpha, steps=cfg.steps, eot_iter=cfg.eot,
                                      random_start=cfg.random_start)
        else:
            cls = torchattacks.PGD if cfg.norm == "Linf" else torchattacks.PGDL2
            atk = cls(m, eps=eps, alpha=alpha, steps=cfg.steps, random_start=cfg.random_start)
        return _torchattack(atk, ctx.run.device)

    _run("pgd", model, ctx, report, cfg, build, cfg.norm, eps)


def mifgsm(model, ctx, report, cfg: MIFGSMConfig) -> None:
    import torchattacks

    eps = _eps(ctx.run, cfg, "Linf")
    alpha = cfg.alpha if cfg.alpha is not None else eps / cfg.steps

    def build(m):
        return _torchattack(torchattacks.MIFGSM(m, eps=eps, alpha=alpha, steps=cfg.steps, decay=cfg.decay),
                            ctx.run.device)

    _run("mifgsm", model, ctx, report, cfg, build, "Linf", eps)


def cw(model, ctx, report, cfg: CWConfig) -> None:
    import torchattacks

    def build(m):
        return _torchattack(torchattacks.CW(m, c=cfg.c, kappa=cfg.kappa, steps=cfg.steps, lr=cfg.lr),
                            ctx.run.device)

    within = None
    if cfg.eps is not None:
        def within(x, x_adv):
            return (x_adv - x).flatten(1).float().norm(dim=1) <= cfg.eps

    def sizes(key, res):
        if res["l2"].numel():
            report.add(f"{key}/l2", res["l2"].median().item())

    _run("cw", model, ctx, report, cfg, build, None, cfg.eps, within, sizes)


def _apgd(loss: str, key: str):
    def run_apgd(model, ctx, report, cfg: APGDConfig) -> None:
        import torchattacks

        eps = _eps(ctx.run, cfg, cfg.norm)

        def build(m):
            return _torchattack(torchattacks.APGD(m, norm=cfg.norm, eps=eps, steps=cfg.steps,
                                                  n_restarts=cfg.n_restarts, seed=_seed(ctx.run, cfg), loss=loss,
                                                  eot_iter=cfg.eot or 1, rho=cfg.rho), ctx.run.device)

        _run(key, model, ctx, report, cfg, build, cfg.norm, eps)

    run_apgd.__name__ = key
    return run_apgd


def square(model, ctx, report, cfg: SquareConfig) -> None:
    import torchattacks

    eps = _eps(ctx.run, cfg, cfg.norm)

    def build(m):
        return _torchattack(torchattacks.Square(m, norm=cfg.norm, eps=eps, n_queries=cfg.n_queries,
                                                n_restarts=cfg.n_restarts, p_init=cfg.p_init,
                                                seed=_seed(ctx.run, cfg)), ctx.run.device)

    _run("square", model, ctx, report, cfg, build, cfg.norm, eps)


def _original_autoattack(model, run, cfg: AutoAttackConfig, eps: float) -> AttackFn:
    """pyautoattack's AutoAttack; ``fast`` runs the standard version's APGD-CE and APGD-T only."""
    import pyautoattack

    if cfg.version == "fast":
        # the standard version's first two attacks with exactly its settings (pyautoattack's version 'custom'
        # would run APGD-CE with 5 restarts): fast's robust accuracy is standard's before FAB-T and Square
        adversary = pyautoattack.AutoAttack(model, version="standard", eps=eps, norm=cfg.norm, seed=_seed(run, cfg),
                                            device=run.device)
        adversary.attacks_to_run = ["apgd-ce", "apgd-t"]
    else:
        adversary = pyautoattack.AutoAttack(model, version=cfg.version, eps=eps, norm=cfg.norm, seed=_seed(run, cfg),
                                            device=run.device)
    # targeted attacks cannot target more classes than there are
    most = run.data.num_classes - 1
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, most)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, most)
    if cfg.eot is not None:  # as version 'rand' sets its 20
        adversary.apgd.eot_iter = adversary.apgd_targeted.eot_iter = cfg.eot

    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with keep_trace():
            out = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
        return out[0] if isinstance(out, tuple) else out  # pyautoattack 0.2 returns (x_adv, y_adv)

    return attack


def autoattack(model, ctx, report, cfg: AutoAttackConfig) -> None:
    run = ctx.run
    eps = _eps(run, cfg, cfg.norm)
    if cfg.implementation == "torchattacks":
        import torchattacks

        tag = f"torchattacks-{cfg.version}"

        def build(m):
            return _torchattack(torchattacks.AutoAttack(m, norm=cfg.norm, eps=eps, version=cfg.version,
                                                        n_classes=run.data.num_classes, seed=_seed(run, cfg)),
                                run.device)
    else:
        tag = cfg.version

        def build(m):
            return _original_autoattack(m, run, cfg, eps)

    def by_version(key, res):
        report.accuracy(f"{key}/{tag}/acc", res["robust"], res["labels"])

    _run("autoattack", model, ctx, report, cfg, build, cfg.norm, eps, after=by_version)


EVALUATORS = [
    Evaluator("fgsm", fgsm,
              "FGSM (torchattacks), Linf: robust accuracy fgsm/acc, clean accuracy of the subset fgsm/clean_acc"),
    Evaluator("pgd", pgd,
              "PGD with random start (torchattacks PGD / PGDL2), Linf or L2; steps 20, step size 2.5*eps/steps"),
    Evaluator("mifgsm", mifgsm, "MI-FGSM (torchattacks), Linf, 10 steps, momentum 1.0"),
    Evaluator("cw", cw,
              "Carlini-Wagner L2 (torchattacks, c=1, 100 steps); cw/l2 is the median L2 size of successful "
              "adversarial examples. Its tanh parametrisation cannot move pixels that are exactly 0 or 1 "
              "(most of an MNIST digit), so it is weak on MNIST"),
    Evaluator("apgd", _apgd("ce", "apgd"),
              "APGD-CE (torchattacks APGD, loss ce), 100 iterations as in the original AutoAttack"),
    Evaluator("apgd_dlr", _apgd("dlr", "apgd_dlr"),
              "APGD-DLR (torchattacks APGD, loss dlr), 100 iterations as in the original AutoAttack"),
    Evaluator("square", square, "Square Attack (torchattacks), score-based, 5000 queries"),
    Evaluator("autoattack", autoattack,
              "AutoAttack: the original (pyautoattack; standard: APGD-CE, APGD-T, FAB-T, Square with 100 "
              "iterations per APGD; fast: APGD-CE and APGD-T), or implementation: torchattacks (10 iterations "
              "per APGD: weaker). Keys autoattack/acc and autoattack/<version>/acc "
              "(autoattack/torchattacks-<version>/acc for torchattacks)"),
]
