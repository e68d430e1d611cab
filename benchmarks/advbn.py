"""AdvBN training step: normlab's (front once, PGD on the tail only) versus a naive one (whole network per PGD step).

Both sides train the same model on the same batches: timm ``resnet18`` behind
``NormlabNet``, built by the real host (``prepare`` + ``Run.build``) with the
advbn plugin (split after ``layer1``, 6 steps of 0.2, eps 1.1, only the tail
trains, main/aux BNs in the tail), embedded MNIST at 32x32, batch 128, SGD.
The naive side is a deep copy of the same built model with its own optimizer.

(a) advbn: one host training step exactly as ``normlab.train`` runs it: the
    forward (front once, tail through the main BNs; the plugin keeps f), the
    ``ce`` term, the plugin's ``on_loss`` (the attack repeats only the tail on
    the detached f, then one train-mode tail forward through the aux BNs),
    backward, optimizer step.
(b) naive: the same loss and attack, written the obvious way: a forward hook
    on ``layer1`` perturbs its output, and every forward is the whole model
    ``model(x)``: the clean forward, each of the 6 PGD steps (eval mode, aux
    BNs, gradients for the multipliers only, as (a)) and the adversarial
    train-mode forward. So the front runs 8 times per step instead of once.

Before timing, both sides take one step from the same weights on the same
batch and their losses are compared (they compute the same thing). Then the
two sides alternate step by step in one process (the order flips every
repetition), and the result line gives the median step time of each side and
the median of the per-pair ratios advbn/naive (target <= 0.8). The FLOPs of one
step of each side are printed first: their ratio is what the step-time ratio
would be if every FLOP took the same time (the front's convolutions run at a
lower rate than the tail's, so the measured ratio comes out below it).

Usage::

    .venv/bin/python benchmarks/advbn.py [--steps N] [--threads 1 --clock cpu] [--device cpu|cuda]

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("NORMLAB_LOAD_PLUGINS", "advbn")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import normlab_advbn as advbn  # noqa: E402
from normlab.config import parse_run  # noqa: E402
from normlab.context import Context  # noqa: E402
from normlab.data import Batch  # noqa: E402
from normlab.evals.attacks import attack_mode  # noqa: E402
from normlab.layers import padding_taps_kept  # noqa: E402
from normlab.runner import prepare  # noqa: E402
from normlab.train import LossTerms, autocast, build_optimizer  # noqa: E402

TARGET = 0.8
REFERENCE_TARGET = 0.85  # issue 18: our step / the public code's without anomaly detection
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def build(args):
    cfg = parse_run({
        "seed": 0, "model": {"name": args.model},
        "data": {"name": "mnist", "batch_size": args.batch, "num_workers": 0, "image_size": args.image_size},
        "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "constant", "device": args.device, "amp": args.amp,
                  "channels_last": args.channels_last},
        "plugins": {"advbn": {"layer": args.layer, "steps": args.pgd_steps, "step_size": 0.2, "eps": 1.1}},
        "evaluate": {}}, "benchmark")
    run = prepare(cfg, "benchmark", quiet=True)
    run.build()
    return run


class AdvbnSide:
    """The host's training step (normlab.train's loop body) with the advbn plugin."""

    def __init__(self, run, fold: bool = True, opt=None):
        self.run, self.model, self.fold = run, run.model, fold
        self.opt = opt or build_optimizer(run.trainable_parameters(), run.config.train)

    def step(self, x, y) -> float:
        run = self.run
        run.plugin_config("advbn").fold = self.fold
        run.train_mode()
        batch = Batch(x, y)
        ctx = Context(run=run, training=True)
        with ctx.active(), autocast(run.device, run.config.train.amp):
            batch.logits = self.model(batch.x)
            terms = LossTerms()
            terms.add("ce", F.cross_entropy(batch.logits.float(), batch.y, reduction="none"))
            run.hooks.call("on_loss", batch=batch, model=self.model, ctx=ctx, terms=terms)
            loss = terms.total()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class AllTaps:
    """A side's step with every convolution computing all its kernel taps (normlab.layers.taps skips the
    ones that meet only padding: layer4's at 32x32), for the before/after of that exact change."""

    def __init__(self, side):
        self.side = side

    def step(self, x, y) -> float:
        with padding_taps_kept(self.side.model):
            return self.side.step(x, y)


class NaiveSide:
    """The same loss and attack, every forward through the whole model (a hook perturbs layer1's output)."""

    def __init__(self, run):
        self.run = run
        layer = run.plugin_config("advbn").layer
        hooks = run.model.backbone.get_submodule(layer)._forward_hooks
        kept = dict(hooks)
        hooks.clear()  # the host's feature hook (it holds the plugin manager): this side perturbs by itself
        self.model = copy.deepcopy(run.model)
        hooks.update(kept)
        self.model.backbone.get_submodule(layer).register_forward_hook(self._hook)
        self.pert = None  # (mu, d_sigma, d_mu) while perturbing
        self.f = None
        self.front = [p for n, p in self.model.named_parameters() if not p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = build_optimizer(self.params, run.config.train)
        self.train_prefixes = run.trainable

    def _hook(self, module, inputs, out):
        if self.pert is None:
            self.f = out
            return None
        mu, ds, dm = self.pert
        return advbn.perturb(out.float(), mu, ds, dm, self.clamp)

    def train_mode(self):
        self.model.train()
        for name, m in self.model.backbone.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not advbn._under(name, self.train_prefixes):
                m.eval()

    def step(self, x, y) -> float:
        cfg = self.run.plugin_config("advbn")
        self.train_mode()
        ctx = Context(run=self.run, training=False)  # no feature capture by the plugin on this side
        with ctx.active(), autocast(self.run.device, self.run.config.train.amp):
            self.pert = None
            ce = F.cross_entropy(self.model(x).float(), y)
            f = self.f.detach().float()
            self.clamp = bool((f >= 0).all())
            mu = f.mean(dim=(0, 2, 3), keepdim=True)
            ds = torch.ones_like(mu, requires_grad=True)
            dm = torch.ones_like(mu, requires_grad=True)
            with attack_mode(self.model), ctx.using(route="aux", perturb=True):
                for _ in range(cfg.steps):
                    self.pert = (mu, ds, dm)
                    loss = F.cross_entropy(self.model(x).float(), y)
                    gs, gm = torch.autograd.grad(loss, (ds, dm))
                    with torch.no_grad():
                        ds.add_(gs.sign(), alpha=cfg.step_size).clamp_(1 - cfg.eps, 1 + cfg.eps)
                        dm.add_(gm.sign(), alpha=cfg.step_size).clamp_(1 - cfg.eps, 1 + cfg.eps)
            self.pert = (mu, ds.detach(), dm.detach())
            with ctx.using(route="aux", perturb=True):
                adv = F.cross_entropy(self.model(x).float(), y)
            self.pert = None
            loss = ce + cfg.weight * adv
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def step_flops(side, x, y) -> int:
    """Floating-point operations of one (untimed) training step of ``side``, forward and backward, as the
    host counts a run's step (:class:`normlab.train.FlopCount`: torch's FLOP formulas, convolutions and
    matmuls)."""
    from normlab.train import FlopCount

    with FlopCount() as counter:
        side.step(x, y)
    return counter.total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--layer", default="layer1")
    p.add_argument("--pgd-steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (both sides)")
    p.add_argument("--reference", metavar="DIR", help="a work tree of azshue/AdvBN: also time its own training step "
                                                      "(with and without its anomaly detection; benchmarks/_reference.py)")
    p.add_argument("--channels-last", choices=("auto", "cuda", "true", "false"), default="auto",
                   help="train.channels_last of the run, both sides (default auto, the run files' default)")
    p.add_argument("-q", action="store_true", help="print only the result line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    run = build(args)
    ours, naive = AdvbnSide(run), NaiveSide(run)
    unfolded = AdvbnSide(run, fold=False, opt=ours.opt)  # the same model and optimizer, fold: false
    loader = run.data.loader("train", args.batch, seed=0, drop_last=True)
    batches = [(run.to_device(x), y.to(run.device)) for x, y in loader][: args.steps + args.warmup]

    # same weights, same batch: the two sides compute the same loss
    state = copy.deepcopy(ours.model.state_dict())
    naive.model.load_state_dict(state)
    torch.manual_seed(0)
    l_ours = ours.step(*batches[0])
    torch.manual_seed(0)
    l_naive = naive.step(*batches[0])
    if not args.q:
        print(f"same first step: advbn loss {l_ours:.6f}, naive loss {l_naive:.6f} "
              f"(difference {abs(l_ours - l_naive):.2e})")

    flops = {name: step_flops(side, *batches[0]) for name, side in (("advbn", ours), ("naive", naive),
                                                                     ("all_taps", AllTaps(ours)))}
    if not args.q:
        print(f"FLOPs per step (torch.utils.flop_counter): advbn {flops['advbn'] / 1e9:.1f} G, naive "
              f"{flops['naive'] / 1e9:.1f} G, ratio {flops['advbn'] / flops['naive']:.3f} (the ratio if every "
              f"FLOP cost the same time); advbn with every kernel tap computed {flops['all_taps'] / 1e9:.1f} G")

    sides = {"advbn": ours, "unfolded": unfolded, "naive": naive, "all_taps": AllTaps(ours),
             "naive_all_taps": AllTaps(naive)}
    if args.reference:
        from _reference import AdvbnReference  # benchmarks/_reference.py, beside this script

        for name, anomaly in (("reference", True), ("reference_no_anomaly", False)):
            sides[name] = AdvbnReference(args.reference, run.data.num_classes, args.pgd_steps,
                                         run.config.train.lr, anomaly)
        ref = sides["reference"]
        sides["reference_no_anomaly"].model.load_state_dict(ref.model.state_dict())
        if not args.q:
            f_ref = step_flops(sides["reference_no_anomaly"], *batches[0])
            print(f"FLOPs per step: azshue/AdvBN's step {f_ref / 1e9:.1f} G (advbn {flops['advbn'] / 1e9:.1f} G)")
    times = {name: [] for name in sides}
    for i, (x, y) in enumerate(batches):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in order:
            sync(run.device)
            t0 = clock()
            sides[name].step(x, y)
            sync(run.device)
            if i >= args.warmup:
                times[name].append(clock() - t0)
        if not args.q and i >= args.warmup:
            print(f"step {i - args.warmup + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ma, mu, mn = (statistics.median(times[k]) for k in ("advbn", "unfolded", "naive"))
    print(f"advbn: {args.model} split after {args.layer}, batch {args.batch} at {run.data.image_size}x"
          f"{run.data.image_size}, {args.pgd_steps} PGD steps, {run.device.type}"
          f"{', channels-last' if run.channels_last else ''}: advbn {ma:.4f} s/step "
          f"(unfolded {mu:.4f}), naive {mn:.4f} s/step, ratio {ratio('advbn', 'naive'):.3f} (unfolded "
          f"{ratio('unfolded', 'naive'):.3f}; folded / unfolded {ratio('advbn', 'unfolded'):.3f}; target <= {TARGET})")
    print(f"padding taps: with every kernel tap computed, advbn {statistics.median(times['all_taps']):.4f} s/step, "
          f"naive {statistics.median(times['naive_all_taps']):.4f} s/step, "
          f"ratio {ratio('all_taps', 'naive_all_taps'):.3f}; "
          f"skipped / kept: advbn {ratio('advbn', 'all_taps'):.3f}, naive {ratio('naive', 'naive_all_taps'):.3f}")
    if args.reference:
        print(f"advbn vs azshue/AdvBN's own step: reference {statistics.median(times['reference']):.4f} s/step, "
              f"without its anomaly detection {statistics.median(times['reference_no_anomaly']):.4f} s/step; ratio "
              f"{ratio('advbn', 'reference'):.3f}, without anomaly detection {ratio('advbn', 'reference_no_anomaly'):.3f} "
              f"(target <= {REFERENCE_TARGET}; unfolded {ratio('unfolded', 'reference_no_anomaly'):.3f}, every kernel "
              f"tap computed {ratio('all_taps', 'reference_no_anomaly'):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
