"""Host overhead: normlab's training step with a no-op plugin versus a plain PyTorch loop.

DESIGN.md section 7: hook dispatch and context handling must cost under 2% of a
training step. Both sides train the same model (timm ``resnet18``, 10 classes,
behind :class:`normlab.model.NormlabNet` with the MNIST mean/std, the same
initial weights) on the same data (the embedded MNIST train split, 32x32,
through the same :meth:`normlab.data.DataBundle.loader`, same order), batch
128, SGD lr 0.05 momentum 0.9, no weight decay, constant learning rate, fp32.

(a) plain: ``x, y = next(batches); forward; cross_entropy; backward; step``.
(b) normlab: the real :func:`normlab.train.train` on a run built with
    :func:`normlab.runner.prepare` (the no-op plugin passed as an extra plugin)
    and :meth:`Run.build`. The no-op plugin implements every hook, each
    returning None; ``on_model`` requests the ``layer1`` feature, so
    ``on_feature`` fires on every forward.

Method ``pairs`` (default). ``train()`` is not changed: the training loader it
asks ``run.data`` for is wrapped so that it stamps the time when the loop asks
for a batch and when it comes back for the next one. One normlab step is
fetching a batch plus the whole loop body (hooks, context, loss terms, the
finiteness check, backward, optimizer and scheduler step, metric
bookkeeping, the progress bar). Each time ``train()`` comes back for a batch,
the wrapper first runs and times one plain step (fetch plus body) on the
plain model, before fetching normlab's next batch. So the two sides alternate
step by step, ABAB..., in one process, and each normlab step has a plain step
as its neighbour: contention from other processes, which comes in bursts of
seconds, hits both sides of a pair alike. ``train()``'s per-epoch work
(validation pass, checkpoint, metrics file) happens after the last step and is
not counted. The first step of every epoch (optimizer state allocation) is
dropped on both sides. Reported: the median step time of each side, and the
ratio as the median of the per-step ratios normlab/plain.

Method ``diff`` (a cross-check that looks only at whole calls): per
repetition it times whole ``train()`` calls with ``data.n_train`` at two sizes
and divides the difference by the difference in steps, which cancels the
per-epoch costs; the plain loop is timed the same way, alternating with
normlab. It is noisier: it alternates whole epochs instead of steps, and the
fixed costs (validation, checkpoint write) vary from call to call.

Both sides are reset to the same initial weights at the start of every
repetition, so every repetition measures the same work.

Usage::

    .venv/bin/python benchmarks/host_overhead.py [--steps N] [--repeats R] [--method pairs|diff]

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _paired import paired_ratio  # benchmarks/_paired.py, beside this script

# Load only the plugin passed below, not whatever is installed (read when plugins are discovered).
os.environ.setdefault("NORMLAB_LOAD_PLUGINS", "")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import normlab  # noqa: E402
from normlab.config import DataConfig, parse_run  # noqa: E402
from normlab.data import STATS, build_data  # noqa: E402
from normlab.model import NormlabNet  # noqa: E402
from normlab.runner import prepare, seed_everything  # noqa: E402
from normlab.train import train  # noqa: E402

BATCH = 128
LR, MOMENTUM = 0.05, 0.9
SEED = 0
TARGET = 1.02
MAX_STEPS = 4000 // BATCH  # one epoch of the embedded train split (4,000 images, drop_last)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # what step times are read from (--clock)


class NoOp:
    """Implements every hook and changes nothing."""

    @normlab.hookimpl
    def on_model(self, model, run):
        run.request_feature("layer1")
        return None

    @normlab.hookimpl
    def on_batch_norm(self, name, module, model, run):
        return None

    @normlab.hookimpl
    def on_feature(self, name, feature, ctx):
        return None

    @normlab.hookimpl
    def on_batch(self, batch, ctx):
        return None

    @normlab.hookimpl
    def on_loss(self, batch, model, ctx, terms):
        return None

    @normlab.hookimpl
    def on_domain(self, model, domain, samples, ctx):
        return None

    @normlab.hookimpl
    def on_eval(self, model, ctx, report):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StampedLoader:
    """Wraps the DataLoader ``train()`` iterates; times each step and runs ``between(i)`` after step i.

    It offers what ``train()`` uses of a loader: iteration, ``len`` and ``sampler``.
    Step i's time runs from asking for batch i to coming back for batch i + 1.
    """

    def __init__(self, loader, device: torch.device, between=None):
        self.loader, self.device, self.between = loader, device, between
        self.sampler = loader.sampler
        self.times: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        i = 0
        while True:
            _sync(self.device)
            t0 = clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            yield batch
            _sync(self.device)
            self.times.append(clock() - t0)
            if self.between is not None:
                self.between(i)
            i += 1


def run_config(steps: int, device: str) -> dict:
    return {
        "seed": SEED,
        "model": {"name": "resnet18"},
        "data": {"name": "mnist", "batch_size": BATCH, "n_train": BATCH * steps, "num_workers": 0},
        "train": {"epochs": 1, "optimizer": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": 0.0,
                  "schedule": "constant", "warmup_epochs": 0, "device": device,
                  # fp32 and the default memory format, as in the plain loop
                  "amp": False, "channels_last": False},
        "plugins": {"noop": {}},
        "evaluate": {"clean": {}},
    }


class NormlabSide:
    """A run built by the real host (prepare, build), trained by the real ``train()``."""

    def __init__(self, steps: int, device: str, run_dir: Path):
        cfg = parse_run(run_config(steps, device), "benchmark")
        self.run = run = prepare(cfg, "benchmark", extra_plugins={"noop": NoOp()}, quiet=True)
        run.build()
        run.dir = run_dir
        for hook in ("on_model", "on_batch_norm", "on_feature", "on_batch", "on_loss", "on_domain", "on_eval"):
            assert "noop" in run.hooks.implemented(hook), f"the no-op plugin is not called for {hook}"
        assert run.features == ["layer1"]
        self.initial = copy.deepcopy(run.model.state_dict())
        self.between = None
        self.last: StampedLoader | None = None
        real_loader = run.data.loader

        def loader(split, *args, **kwargs):  # wrap only the training loader train() asks for
            dl = real_loader(split, *args, **kwargs)
            if split != "train":
                return dl
            self.last = StampedLoader(dl, run.device, self.between)
            return self.last

        run.data.loader = loader  # an instance attribute: shadows the method for this run only

    def reset(self) -> None:
        self.run.model.load_state_dict(self.initial)

    def epoch(self, steps: int, between=None) -> list[float]:
        """One ``train()`` call of ``steps`` steps; the step times, the first left out."""
        self.run.config.data.n_train = BATCH * steps
        self.between = between
        train(self.run)
        return self.last.times[1:]


class PlainSide:
    """A hand-written loop over the same model, data and loader."""

    def __init__(self, device: torch.device, initial: dict):
        self.device = device
        seed_everything(SEED)
        self.data = build_data(DataConfig(name="mnist", batch_size=BATCH))
        mean, std = STATS["mnist"]
        self.model = NormlabNet(timm.create_model("resnet18", num_classes=10), mean, std)
        self.initial = initial
        self.reset()
        self.model.to(device)
        self.opt = self.batches = None
        self.times: list[float] = []

    def reset(self) -> None:
        self.model.load_state_dict(self.initial)

    def start(self, steps: int) -> None:
        """Begin an epoch of ``steps`` batches with a fresh optimizer (as ``train()`` does)."""
        self.batches = iter(self.data.loader("train", BATCH, seed=SEED, n=BATCH * steps, drop_last=True))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.model.train()
        self.times = []

    def step(self) -> None:
        model, opt, device = self.model, self.opt, self.device
        _sync(device)
        t0 = clock()
        x, y = next(self.batches)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        self.times.append(clock() - t0)

    def epoch(self, steps: int) -> list[float]:
        self.start(steps)
        for _ in range(steps):
            self.step()
        return self.times[1:]


def measure_pairs(plain: PlainSide, nl: NormlabSide, steps: int, repeats: int, verbose: bool):
    p_all, n_all = [], []
    for r in range(repeats):
        plain.reset()
        nl.reset()
        plain.start(steps)
        n_times = nl.epoch(steps, between=lambda i: plain.step())
        p_times = plain.times[1:]
        assert len(p_times) == len(n_times) == steps - 1, (len(p_times), len(n_times))
        p_all += p_times
        n_all += n_times
        if verbose:
            ratios = [n / p for p, n in zip(p_times, n_times)]
            print(f"  repeat {r + 1}/{repeats}: plain {statistics.median(p_times):.4f}  "
                  f"normlab {statistics.median(n_times):.4f}  ratio {statistics.median(ratios):.3f}", flush=True)
    return p_all, n_all


def diff_small(steps: int) -> int:
    """The smaller epoch of the difference method."""
    return max(3, steps // 4)


def measure_diff(plain: PlainSide, nl: NormlabSide, steps: int, repeats: int, verbose: bool):
    small = diff_small(steps)

    def wall(side, k):
        side.reset()
        t0 = clock()
        side.epoch(k)
        return clock() - t0

    p_all, n_all = [], []
    for r in range(repeats):
        sides = (("plain", plain), ("normlab", nl))
        got = {name: (wall(side, steps) - wall(side, small)) / (steps - small)
               for name, side in (sides if r % 2 == 0 else sides[::-1])}
        p_all.append(got["plain"])
        n_all.append(got["normlab"])
        if verbose:
            print(f"  repeat {r + 1}/{repeats}: plain {got['plain']:.4f}  normlab {got['normlab']:.4f}  "
                  f"ratio {got['normlab'] / got['plain']:.3f}", flush=True)
    return p_all, n_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=MAX_STEPS,
                    help=f"training steps per repetition and side (batch {BATCH}; 3 to {MAX_STEPS}; "
                         f"default {MAX_STEPS})")
    ap.add_argument("--repeats", type=int, default=6, help="repetitions (train() calls) per side (default 6)")
    ap.add_argument("--warmup", type=int, default=4, help="steps of each side run first and discarded (default 4)")
    ap.add_argument("--method", choices=("pairs", "diff"), default="pairs",
                    help="pairs: alternate single steps inside the real loop (default); diff: difference of "
                         "whole train() calls at two sizes")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both sides (default: torch's choice); 1 steadies the numbers "
                         "on a machine shared with other busy processes")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall: elapsed time (default); cpu: CPU time of the process, which time spent waiting "
                         "for other processes does not inflate (use with --threads 1: idle torch worker threads "
                         "spin and count as CPU time)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result line")
    args = ap.parse_args(argv)
    if not 3 <= args.steps <= MAX_STEPS:
        ap.error(f"--steps must be between 3 and {MAX_STEPS} (one epoch of the embedded MNIST train split)")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    global clock
    clock = CLOCKS[args.clock]
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.method == "diff" and args.steps - diff_small(args.steps) < 4:
        ap.error("--method diff needs --steps of at least 8")

    try:
        t_start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="normlab-bench-") as tmp:
            nl = NormlabSide(args.steps, args.device, Path(tmp))
            plain = PlainSide(nl.run.device, nl.initial)
            if not args.quiet:
                print(f"host_overhead: resnet18, batch {BATCH}, {args.steps} steps x {args.repeats} repeats per "
                      f"side, method {args.method}, clock {args.clock}, device {nl.run.device}, torch threads "
                      f"{torch.get_num_threads()}", flush=True)
            if args.warmup:  # allocator, kernels, the loader path
                plain.epoch(max(3, args.warmup))
                nl.epoch(max(3, args.warmup))
            measure = measure_pairs if args.method == "pairs" else measure_diff
            p_times, n_times = measure(plain, nl, args.steps, args.repeats, not args.quiet)
    except Exception as e:  # a measurement: report and exit 0
        print(f"host_overhead: failed: {type(e).__name__}: {e}", flush=True)
        return 0

    p_med, n_med = statistics.median(p_times), statistics.median(n_times)
    ratio, spread = paired_ratio(n_times, p_times, t_start)
    if not args.quiet:
        print(f"  {spread}", flush=True)
    print(f"host_overhead: plain {p_med:.4f} s/step, normlab {n_med:.4f} s/step, ratio {ratio:.3f} "
          f"(target <= {TARGET:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
