"""Eval throughput: the ``corruptions`` evaluator on cached sets versus a plain forward pass; cache generation time.

Issue 3, Performance:

- on cached corruption sets, evaluation runs within 10% of a plain forward
  pass over the same images (target: ratio <= 1.10);
- the embedded test split's corruptions (1,000 images x 15 x 5) generate in
  under 3 minutes on 2 cores, once.

Part 1, generation. A fresh cache directory (a temporary one unless
``--cache-dir`` names one) is filled for the embedded MNIST test split through
:meth:`normlab.evals.corruptions.CorruptionCache.ensure`, the evaluator's own
code path, with ``--workers`` processes (default 2). Printed: seconds, and the
cost per image per severity (all 15 corruptions, one core). A second
``ensure`` must find everything cached (printed as well).

Part 2, evaluation. One process, one model (timm ``resnet18``, 10 classes,
behind ``NormlabNet``, built by :func:`normlab.runner.prepare` and
:meth:`Run.build`; weights untouched: throughput does not depend on them),
same batch size on both sides, the same images:

(a) normlab: the real ``corruptions`` evaluator function, called with the
    run's context on the cached sets (clean reference plus every corruption and
    severity asked for): cache check, memory-mapped reads, uint8-to-float
    conversion, ``run.domain`` per domain, :func:`normlab.train.evaluate_accuracy`
    (progress bar, accuracy bookkeeping), the report;
(b) plain: ``model(x)`` over the same images as float tensors on the device,
    batch by batch, in eval mode under ``no_grad`` (and bf16 autocast on CUDA,
    as the evaluator), nothing else. Its inputs are built just before its
    timed loop, untimed, and dropped after it, so both sides hold the same
    memory while they run.

How it pairs them. A benchmark plugin implements ``on_domain``; the evaluator
calls it once at the start of each domain (the clean reference and each
corruption x severity). Inside that call the plugin runs and times the plain
pass: on even repetitions over the domain the evaluator is about to evaluate,
on odd ones over the domain it has just evaluated (the last one after the
evaluator returns), so neither side always goes first. The two sides
alternate domain by domain, and a burst of load from another process hits
both members of a pair. The evaluator's time is its call's elapsed time minus
the time spent inside the plugin. Printed per repetition: both totals and
their ratio; at the end: the ratio of the sums and the median of the
per-domain ratios (a domain's normlab time runs from the end of its
``on_domain`` call to the start of the next one, so it also holds the next
domain's set-up). ``--clock cpu`` times both sides with this process's CPU
time instead of elapsed time: with ``--threads 1`` it ignores the time spent
waiting for other processes on a shared machine (with more threads, idle
torch threads spinning count as CPU time).

Usage::

    .venv/bin/python benchmarks/eval_throughput.py                 # about 3 to 7 minutes on 2 cores
    .venv/bin/python benchmarks/eval_throughput.py --threads 1 --clock cpu   # steadier on a busy machine
    .venv/bin/python benchmarks/eval_throughput.py --skip-generation --cache-dir ~/.cache/normlab/data/corruptions

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NORMLAB_LOAD_PLUGINS", "")  # only the plugin passed below

import torch
from normlab import hookimpl
from normlab.config import parse_run
from normlab.context import Context
from normlab.evals import EVALUATORS, Report
from normlab.evals import corruptions as C
from normlab.runner import prepare
from normlab.train import autocast

TARGET_RATIO = 1.10
TARGET_GENERATION_S = 180.0
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # part 2's clock (--clock); generation is always timed by the wall clock


class PlainSide:
    """The benchmark plugin: in each ``on_domain`` call, time a plain forward over one domain's images.

    ``order`` ``before``: the domain the evaluator is about to evaluate;
    ``after``: the one it has just evaluated (the last one runs after the
    evaluator returns). The plain inputs are built inside the hook, untimed, and
    freed after, so both sides hold the same memory while they run.
    """

    def __init__(self):
        self.sources: dict[str, tuple] = {}  # domain -> (images, labels) as the evaluator reads them
        self.run = None
        self.batch_size = 256
        self.reset("before")

    def reset(self, order: str) -> None:
        self.order = order
        self.pending: str | None = None
        self.current: str | None = None
        self.last_end: float | None = None
        self.hook_time = 0.0
        self.plain: dict[str, float] = {}
        self.normlab: dict[str, float] = {}

    def forward(self, domain: str) -> None:
        run = self.run
        xs = [b[0] for b in C._Batches(run, *self.sources[domain], batch_size=self.batch_size)]  # untimed
        _sync(run.device)
        t0 = clock()
        with torch.no_grad(), autocast(run.device, run.config.train.amp):
            for x in xs:
                run.model(x)
        _sync(run.device)
        self.plain[domain] = clock() - t0

    def close(self, t_end: float) -> None:
        """After the evaluator returned at ``t_end``: account its last domain; run the last plain pass."""
        self.normlab[self.current] = t_end - self.last_end
        if self.order == "after":
            self.forward(self.pending)

    @hookimpl
    def on_domain(self, model, domain, samples, ctx):
        t_in = clock()
        if self.current is not None:
            self.normlab[self.current] = t_in - self.last_end
        if self.order == "before":
            self.forward(domain)
        elif self.pending is not None:
            self.forward(self.pending)
        self.pending = self.current = domain
        self.last_end = clock()
        self.hook_time += self.last_end - t_in


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate(cache_dir: Path, n: int, workers: int, run, quiet: bool) -> tuple[float, float]:
    key, folder = C.cache_key(run.data, run.config.data)
    cache = C.CorruptionCache(cache_dir / key, folder, C._SplitImages(run.data), dataset=key)
    t0 = time.perf_counter()
    cache.ensure(C.COMMON, n, workers, quiet=quiet)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache.ensure(C.COMMON, n, workers, quiet=True)
    again = time.perf_counter() - t0
    if cache.generated:
        print("  warning: the second ensure() generated again:", cache.generated)
    return first, again


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="images per domain (the embedded test split has 1,000)")
    p.add_argument("--corruptions", default="gaussian_noise,glass_blur,fog",
                   help="comma list for part 2, or 'all' (all 15: about 5 times longer)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=4, help="evaluator calls; the plain pass alternates before/after")
    p.add_argument("--workers", type=int, default=2, help="generating processes")
    p.add_argument("--cache-dir", default=None, help="default: a fresh temporary directory (times generation)")
    p.add_argument("--skip-generation", action="store_true", help="part 2 only (generates what it needs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="part 2: elapsed time, or this process's CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result lines")
    args = p.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    names = list(C.COMMON) if args.corruptions == "all" else [c for c in args.corruptions.split(",") if c]

    if args.threads:
        torch.set_num_threads(args.threads)
    plain = PlainSide()
    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="normlab-bench-")
        cache_dir = Path(tmp.name)
    else:
        cache_dir = Path(args.cache_dir).expanduser()
    settings = {"n_examples": args.n, "corruptions": names, "batch_size": args.batch_size,
                "cache_dir": str(cache_dir), "workers": args.workers, "plot": False}
    cfg = parse_run({"seed": 0, "model": {"name": "resnet18"}, "data": {"name": "mnist"},
                     "train": {"device": args.device}, "plugins": {"bench": {}},
                     "evaluate": {"corruptions": settings}}, "eval_throughput")
    run = prepare(cfg, "eval_throughput", {"bench": plain}, quiet=True)
    run.build()
    run.model.eval()
    plain.run = run
    say = (lambda *a: None) if args.quiet else print
    say(f"eval_throughput: torch {torch.__version__}, {torch.get_num_threads()} threads, device {run.device}, "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    if not args.skip_generation:
        say(f"part 1: generating the embedded test split's corruptions ({args.n} images x 15 x 5) "
            f"with {args.workers} workers into {cache_dir}")
        first, again = generate(cache_dir, args.n, args.workers, run, True if args.quiet else None)
        per = first * args.workers / (args.n * 5) * 1000
        print(f"generation: {first:.1f} s for {args.n} images x 15 corruptions x 5 severities with {args.workers} "
              f"workers ({per:.1f} ms per image per severity, all 15, per worker; target < {TARGET_GENERATION_S:.0f} s); "
              f"reuse: {again:.2f} s; load average now {os.getloadavg()[0]:.2f}")

    cfg_eval = run.evaluators["corruptions"]
    ev = EVALUATORS["corruptions"].fn
    sets = C._Generated(run, cfg_eval)  # generates what part 2 needs when part 1 was skipped
    domains = {"clean": sets.clean()}
    domains.update({f"corruptions/{c}/{s}": sets.get(c, s) for c in names for s in cfg_eval.severities})
    plain.sources, plain.batch_size = domains, args.batch_size
    ev(run.model, Context(run=run), Report(), cfg_eval)  # warm-up
    say(f"part 2: {len(domains)} domains x {sets.n} images, batch {args.batch_size}, {args.repeats} repetitions, "
        f"{args.clock} clock")

    totals_n, totals_p, per_domain = [], [], []
    for rep in range(args.repeats):
        plain.reset("before" if rep % 2 == 0 else "after")
        t0 = clock()
        ev(run.model, Context(run=run), Report(), cfg_eval)
        _sync(run.device)
        t_end = clock()
        plain.close(t_end)
        t_normlab = (t_end - t0) - plain.hook_time
        t_plain = sum(plain.plain.values())
        per_domain += [plain.normlab[d] / plain.plain[d] for d in domains]
        totals_n.append(t_normlab)
        totals_p.append(t_plain)
        say(f"  repetition {rep + 1} (plain {plain.order}): normlab {t_normlab:.2f} s, plain {t_plain:.2f} s, "
            f"ratio {t_normlab / t_plain:.3f} (load {os.getloadavg()[0]:.2f})")
    n_img = sets.n * len(domains)
    ratio = sum(totals_n) / sum(totals_p)
    print(f"eval_throughput: normlab {n_img / statistics.median(totals_n):.0f} img/s, plain "
          f"{n_img / statistics.median(totals_p):.0f} img/s, ratio {ratio:.3f} (total), "
          f"{statistics.median(per_domain):.3f} (median per domain) (target <= {TARGET_RATIO:.2f})")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
