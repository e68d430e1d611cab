"""BN rectification cost: adapting to one test domain, as a ratio to one eval forward of the same batch.

Issue 5, Cost: "benchmarks/bnrect prints the adaptation time as a ratio to one
eval forward of the same batch".

One process, one model (timm ``resnet18`` by default, 10 classes, behind
``NormlabNet``, built by :func:`normlab.runner.prepare` and :meth:`Run.build`
with the bnrect plugin enabled), the same batch of ``--n`` images:

(a) adaptation: entering and leaving ``run.domain("corruptions/bench", x, ctx)``,
    the path every evaluator takes: bnrect's ``on_domain`` (clone the statistics,
    one train-mode forward with cumulative averaging, the variant) and its
    restore;
(b) forward: ``model(x)`` in eval mode under ``no_grad``.

The two alternate, (a) first on even repetitions and (b) first on odd ones,
so a burst of load from another process hits both members of a pair. Printed:
the median time of each and the median of the per-pair ratios.

Usage::

    .venv/bin/python benchmarks/bnrect.py                         # seconds on 2 CPU cores
    .venv/bin/python benchmarks/bnrect.py --threads 1 --clock cpu  # steadier on a busy machine

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--n", type=int, default=32, help="adaptation samples = the batch (default 32, the paper's)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args()

    import torch

    from normlab.config import parse_run
    from normlab.context import Context
    from normlab.runner import prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = parse_run({"seed": 0, "model": {"name": args.model}, "data": {"name": "mnist"},
                     "train": {"epochs": 0, "device": args.device}, "plugins": {"bnrect": {"n_samples": args.n}},
                     "evaluate": {}}, "benchmarks/bnrect.py")
    run = prepare(cfg, "benchmarks/bnrect.py", quiet=True)
    run.build()
    model = run.model.eval()
    x = next(iter(run.data.loader("test", args.n, shuffle=True)))[0].to(run.device)
    ctx = Context(run=run)

    def sync():
        if run.device.type == "cuda":
            torch.cuda.synchronize()

    def adapt() -> float:
        sync()
        t = clock()
        with run.domain("corruptions/bench", x, ctx):
            sync()
        return clock() - t

    @torch.no_grad()
    def forward() -> float:
        sync()
        t = clock()
        with ctx.active():
            model(x)
        sync()
        return clock() - t

    for _ in range(args.warmup):
        adapt(), forward()
    a_times, f_times = [], []
    for i in range(args.repeats):
        if i % 2 == 0:
            a, f = adapt(), forward()
        else:
            f, a = forward(), adapt()
        a_times.append(a)
        f_times.append(f)
    ratios = [a / f for a, f in zip(a_times, f_times)]
    print(f"bnrect: {args.model}, n={args.n}, {run.device.type}, {torch.get_num_threads()} thread(s), "
          f"{args.clock} clock, {args.repeats} pairs")
    print(f"bnrect: adaptation {statistics.median(a_times) * 1e3:.1f} ms, eval forward "
          f"{statistics.median(f_times) * 1e3:.1f} ms, ratio {statistics.median(ratios):.2f} "
          f"(median per pair; min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
