"""OAT step time versus plain PGD-AT step time: the cost of condition (dual BN, FiLM, lambda sampling).

Issue 6 (Performance): an OAT training step (plugins ``condition`` + ``pgd``) may take at most 1.15 times
(issue 18: 1.10) a plain PGD-AT step (plugin ``pgd`` alone at lambda 1: Madry's PGD-AT, the host forward is the
adversarial one) at the same batch, model and attack.

Both sides are runs built by the real host (:func:`normlab.runner.prepare`, :meth:`Run.build`) and trained
by the real :func:`normlab.train.train`: timm ``resnet18`` (10 classes, 32x32, the MNIST mean/std), the
embedded MNIST train split through ``DataBundle.loader``, batch 128, SGD lr 0.05 momentum 0.9 wd 5e-4,
constant schedule, fp32, and the same attack: Linf PGD, eps 0.3, step 0.1, 5 steps, random start (the
settings of ``examples/oat.yaml`` and ``examples/pgd_at_1.0.yaml``). OAT attacks only its lambda != 0
rows (106 of 128) and forwards the clean batch too; PGD-AT attacks all 128 rows and forwards once.

Interleaving: the two ``train()`` calls run in two threads that hand a baton to each other, so exactly one
of them computes at any time and they alternate step by step, ABAB...; the training loader each side asks
``run.data`` for is wrapped to wait for the baton, time the step (fetching the batch plus the whole loop
body: hooks, forwards, attack, loss terms, backward, optimizer step, bookkeeping) and pass the baton on.
A burst of load from other processes therefore hits both sides of a pair alike. The first step of every
``train()`` call (optimizer state allocation) is dropped on both sides; per-epoch validation and the
checkpoint come after the last step and are not counted (validation uses a 128-image test subset to
keep the benchmark short). Both models go back to their initial weights at every repetition.

Reported: the median step time of each side, and the ratio as the median of the per-step ratios
OAT / PGD-AT (also the ratio of medians and of totals).

Usage::

    .venv/bin/python benchmarks/oat.py [--steps N] [--repeats R] [--threads T] [--clock wall|cpu]

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from _paired import HostStep, paired_ratio  # benchmarks/_paired.py, beside this script

os.environ["NORMLAB_LOAD_PLUGINS"] = "condition,pgd"  # only the two plugins compared

import torch  # noqa: E402

from normlab.config import parse_run  # noqa: E402
from normlab.runner import prepare  # noqa: E402
from normlab.train import train  # noqa: E402

BATCH = 128
TARGET = 1.10  # issue 18 (issue 6 asked 1.15)
REFERENCE_TARGET = 0.80  # issue 18: our OAT step / the public OAT code's
MAX_STEPS = 4000 // BATCH  # one epoch of the embedded train split (drop_last)
ATTACK = {"eps": 0.3, "step_size": 0.1, "steps": 5, "norm": "Linf", "random_start": True}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
SIDES = ("oat", "pgd_at")
LAYOUT = {"channels_last": "auto"}  # train.channels_last of every run here (--channels-last; the run file parses it)


def run_config(side: str, steps: int, device: str) -> dict:
    plugins = {"condition": {}, "pgd": dict(ATTACK)} if side == "oat" else {"pgd": {"lam": 1.0, **ATTACK}}
    return {
        "seed": 0,
        "model": {"name": "resnet18"},
        "data": {"name": "mnist", "batch_size": BATCH, "n_train": BATCH * steps, "num_workers": 0},
        "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4,
                  "schedule": "constant", "warmup_epochs": 0, "device": device, "amp": False,
                  "channels_last": LAYOUT["channels_last"]},
        "plugins": plugins,
        "evaluate": {"clean": {}},
    }


class Baton:
    """Strict alternation between the two sides; a side that has finished no longer holds the other up."""

    def __init__(self):
        self.cond = threading.Condition()
        self.turn = 0
        self.done = [False, False]

    def wait(self, me: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me or self.done[1 - me])

    def pass_on(self, me: int) -> None:
        with self.cond:
            self.turn = 1 - me
            self.cond.notify_all()

    def finish(self, me: int) -> None:
        with self.cond:
            self.done[me] = True
            self.turn = 1 - me
            self.cond.notify_all()


class BatonLoader:
    """Wraps the training DataLoader: each step waits for the baton, is timed, and passes it on."""

    def __init__(self, loader, side: "Side"):
        self.loader, self.side = loader, side
        self.sampler = loader.sampler
        self.times: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        side, clock = self.side, self.side.clock
        it = iter(self.loader)
        while True:
            side.baton.wait(side.index)
            _sync(side.device)
            t0 = clock()
            try:
                batch = next(it)
            except StopIteration:
                side.baton.finish(side.index)
                return
            yield batch
            _sync(side.device)
            self.times.append(clock() - t0)
            side.baton.pass_on(side.index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Side:
    """One run built by the real host, trained by the real ``train()`` with a baton-passing loader."""

    def __init__(self, name: str, index: int, steps: int, device: str, run_dir: Path, clock):
        self.name, self.index, self.clock = name, index, clock
        cfg = parse_run(run_config(name, steps, device), f"benchmark:{name}")
        self.run = run = prepare(cfg, f"benchmark:{name}", quiet=True)
        run.build()
        run.dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.device = run.device
        self.initial = copy.deepcopy(run.model.state_dict())
        self.baton: Baton | None = None
        self.loader: BatonLoader | None = None
        real_loader = run.data.loader

        def loader(split, *args, **kwargs):
            if split != "train":
                kwargs["n"] = BATCH  # the per-epoch validation pass, after the timed steps
                return real_loader(split, *args, **kwargs)
            self.loader = BatonLoader(real_loader(split, *args, **kwargs), self)
            return self.loader

        run.data.loader = loader  # an instance attribute: shadows the method for this run only

    def epoch(self, steps: int, baton: Baton, errors: list) -> None:
        self.run.model.load_state_dict(self.initial)
        self.run.config.data.n_train = BATCH * steps
        self.baton = baton
        try:
            train(self.run)
        except BaseException as e:  # report in the main thread; never leave the other side waiting
            errors.append(e)
            baton.finish(self.index)

    def times(self) -> list[float]:
        return self.loader.times[1:]


def alternate(sides: list[Side], steps: int, first: int) -> dict[str, list[float]]:
    """One ``train()`` call per side, stepping alternately; ``first`` starts."""
    baton = Baton()
    baton.turn = first
    errors: list = []
    threads = [threading.Thread(target=s.epoch, args=(steps, baton, errors), name=s.name) for s in sides]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {s.name: s.times() for s in sides}


def diff_ratio(steps: int, repeats: int, device: str, clock, quiet: bool) -> dict[str, list[float]]:
    """Cross-check without threads: per side, time whole ``train()`` calls of ``steps`` and of 2 steps.

    The difference divided by ``steps - 2`` is the cost of a step after the first; the per-epoch
    validation and checkpoint cancel out. The sides run one after the other, order flipped each repeat.
    """
    per_step: dict[str, list[float]] = {s: [] for s in SIDES}

    def timed(side: str, n: int) -> float:
        cfg = run_config(side, n, device)
        cfg["evaluate"] = {}
        run = prepare(parse_run(cfg, f"benchmark:{side}"), f"benchmark:{side}", quiet=True)
        run.build()
        with tempfile.TemporaryDirectory(prefix="normlab-bench-oat-") as tmp:
            run.dir = Path(tmp)
            _sync(run.device)
            t0 = clock()
            train(run)
            _sync(run.device)
            return clock() - t0

    for r in range(repeats):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            per_step[side].append((timed(side, steps) - timed(side, 2)) / (steps - 2))
            if not quiet:
                print(f"  repeat {r + 1}/{repeats}: {side} {per_step[side][-1]:.4f} s/step", flush=True)
    return per_step


def reference(args, clock) -> int:
    """Our OAT step against the public OAT code's own step (benchmarks/_reference.py), same topology and batch.

    Both sides: the CIFAR ResNet-18 (timm ``resnet18`` with ``model.stem: cifar``; the reference's
    ``BasicBlockOAT`` stacked 2-2-2-2), dual BN, the OAT code's FiLM (``film_style: oat``, encoding dim 128),
    lambda choices 0, 0.1, 0.2, 0.3, 0.4, 1 with ceil(N / 6) zeros, PGD-7 at eps 8/255 with the OAT code's step
    min(1.25 eps, eps + 4/255) / 7 and a random start, attacking the nonzero rows; SGD. The same batch of the
    embedded MNIST (32x32, 3 channels) on both sides, steps alternating, order flipped each pair.
    """
    from _reference import OatReference  # benchmarks/_reference.py, beside this script
    from normlab.train import FlopCount

    eps, steps = 8 / 255, 7
    cfg = run_config("oat", 4, args.device)
    cfg["model"]["stem"] = "cifar"
    cfg["data"]["batch_size"] = cfg["data"]["n_train"] = args.reference_batch
    cfg["evaluate"] = {}
    cfg["plugins"] = {"condition": {"choices": OatReference.CHOICES, "film_style": "oat", "dim": 128},
                      "pgd": {"eps": eps, "step_size": min(1.25 * eps, eps + 4 / 255) / steps, "steps": steps,
                              "norm": "Linf", "random_start": True}}
    run = prepare(parse_run(cfg, "benchmark:oat-reference"), "benchmark:oat-reference", quiet=True)
    run.build()
    items = next(iter(run.data.loader("train", args.reference_batch, seed=0, num_workers=0,
                                      n=args.reference_batch, drop_last=True)))
    ours = HostStep(run, items)
    theirs = OatReference(args.reference, run.data.num_classes, 128, eps, steps, run.config.train.lr)
    x, y = items[0].to(run.device), items[1].to(run.device)

    sides = {"normlab": ours, "reference": lambda: theirs.step(x, y)}
    flops = {}
    for name, fn in sides.items():
        fn()  # the first step checks the fold once (an extra forward): count the second
        with FlopCount() as counter:  # torch's FlopCounterMode fails on autograd.grad inside (the attacks)
            fn()
        flops[name] = counter.total
    print(f"oat vs the OAT code: CIFAR ResNet-18, batch {args.reference_batch}, PGD-{steps}, normlab "
          f"{'channels-last' if run.channels_last else 'contiguous'}; FLOPs per step "
          f"normlab {flops['normlab'] / 1e9:.1f} G, reference {flops['reference'] / 1e9:.1f} G", flush=True)
    times = {name: [] for name in sides}
    for i in range(args.steps + 1):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            t0 = clock()
            sides[name]()
            if i:  # the first pair warms up
                times[name].append(clock() - t0)
    ratio = statistics.median(a / b for a, b in zip(times["normlab"], times["reference"]))
    print(f"oat: normlab {statistics.median(times['normlab']):.4f} s/step, the OAT code "
          f"{statistics.median(times['reference']):.4f} s/step, ratio {ratio:.3f} (target <= {REFERENCE_TARGET:.2f}; "
          f"per FLOP {ratio * flops['reference'] / flops['normlab']:.3f})", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help=f"steps per train() call and side (3 to {MAX_STEPS}; "
                                                          "default 12)")
    ap.add_argument("--repeats", type=int, default=3, help="train() calls per side (default 3)")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall: elapsed time (default); cpu: the process's CPU time (use with --threads 1)")
    ap.add_argument("--method", choices=("pairs", "diff"), default="pairs",
                    help="pairs: the two train() calls alternate step by step in two threads (default); diff: "
                         "whole train() calls one after the other, (T(steps) - T(2)) / (steps - 2) per side")
    ap.add_argument("--no-fold", action="store_true", help="pgd's fold: false on both sides (the attacks' BNs "
                                                          "unfolded, as before issue 18)")
    ap.add_argument("--reference", metavar="DIR", help="a work tree of VITA-Group/Once-for-All-Adversarial-Training: "
                                                       "time our OAT step against that code's own (see reference())")
    ap.add_argument("--reference-batch", type=int, default=32, help="the batch of the --reference comparison "
                                                                    "(default 32: the CIFAR stem costs 16x the FLOPs)")
    ap.add_argument("--channels-last", choices=("auto", "cuda", "true", "false"), default="auto",
                    help="train.channels_last of our runs (default auto, the run files' default); the reference "
                         "code runs as written")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result line")
    args = ap.parse_args(argv)
    LAYOUT["channels_last"] = args.channels_last
    if args.no_fold:
        ATTACK["fold"] = False
    if not 3 <= args.steps <= MAX_STEPS:
        ap.error(f"--steps must be between 3 and {MAX_STEPS}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    if args.reference:
        return reference(args, clock)

    if args.method == "diff":
        got = diff_ratio(args.steps, args.repeats, args.device, clock, args.quiet)
        ratio = sum(got["oat"]) / sum(got["pgd_at"])
        print(f"oat (diff): PGD-AT {statistics.median(got['pgd_at']):.4f} s/step, OAT "
              f"{statistics.median(got['oat']):.4f} s/step, ratio {ratio:.3f} (target <= {TARGET:.2f})", flush=True)
        return 0
    times = {s: [] for s in SIDES}
    try:
        t_start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="normlab-bench-oat-") as tmp:
            sides = [Side(name, i, args.steps, args.device, Path(tmp) / name, clock) for i, name in enumerate(SIDES)]
            oat = sides[0].run
            assert oat.enabled == ["condition", "pgd"] and sides[1].run.enabled == ["pgd"]
            if not args.quiet:
                print(f"oat benchmark: resnet18, batch {BATCH}, PGD-{ATTACK['steps']} eps {ATTACK['eps']} step "
                      f"{ATTACK['step_size']}; {args.steps} steps x {args.repeats} repeats per side, clock "
                      f"{args.clock}, device {oat.device}, torch threads {torch.get_num_threads()}", flush=True)
            alternate(sides, 3, 0)  # warm-up: allocator, kernels, the loader path
            for r in range(args.repeats):
                got = alternate(sides, args.steps, r % 2)
                for s in SIDES:
                    times[s] += got[s]
                if not args.quiet:
                    ratios = [a / b for a, b in zip(got["oat"], got["pgd_at"])]
                    print(f"  repeat {r + 1}/{args.repeats}: PGD-AT {statistics.median(got['pgd_at']):.4f}  "
                          f"OAT {statistics.median(got['oat']):.4f}  ratio {statistics.median(ratios):.3f}",
                          flush=True)
    except Exception as e:  # a measurement: report and exit 0
        print(f"oat benchmark: failed: {type(e).__name__}: {e}", flush=True)
        return 0

    oat_t, pgd_t = times["oat"], times["pgd_at"]
    ratio, spread = paired_ratio(oat_t, pgd_t, t_start)
    if not args.quiet:
        print(f"  {spread}", flush=True)
    print(f"oat: PGD-AT {statistics.median(pgd_t):.4f} s/step, OAT {statistics.median(oat_t):.4f} s/step, "
          f"ratio {ratio:.3f} (target <= {TARGET:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
