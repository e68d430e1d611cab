"""OATS step time against the sum of OAT steps at each width, and the peak memory of the two.

Issue 12: one OATS step (plugins ``slim`` + ``condition`` + ``pgd``, widths 1.0, 0.75 and 0.5: the host
runs forward, pgd's attack and terms, and backward once per width, then one optimizer step) may take at
most 1.10 times the sum over the widths of one OAT step of the same network at that width (``slim`` with
that one width, ``condition``, ``pgd``), on the same batch; its peak memory may be at most 1.1 times the
full-width OAT step's (the passes free each width's graph before the next).

Every side is a run built by the real host (:func:`normlab.runner.prepare`, :meth:`Run.build`): timm
``resnet18`` (10 classes, 32x32, MNIST mean/std), batch 128 of the embedded train split (one fixed batch,
reused every step), SGD lr 0.05 momentum 0.9 wd 5e-4, fp32, Linf PGD-5 eps 0.3 step 0.1 with a random
start (examples/oats.yaml's attack at 5 steps). A step is the host's: :func:`normlab.train.step_backward`
(``on_batch``, then a forward, the terms and a backward per pass), then the optimizer step, as
``normlab.train.train`` runs it.

Time: the sides alternate step by step in one process (OATS, then OAT at 1.0, 0.75 and 0.5, the order
rotated each round), so load from other processes hits them alike; the ratio is the median over rounds
of OATS / (the round's three OAT steps). Memory: each side runs in a fresh subprocess that builds the run,
resets the peak resident set (Linux's VmHWM) and takes its first step; the peak during that step less the
resident set before it is the step's memory: its graphs and attack, plus the gradients and momentum buffers
it allocates, the same on every side (on CUDA: ``torch.cuda.max_memory_allocated``).

Usage::

    .venv/bin/python benchmarks/oats.py [--rounds N] [--threads T] [--device cpu|cuda]

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _paired import HostStep  # benchmarks/_paired.py, beside this script

os.environ.setdefault("NORMLAB_LOAD_PLUGINS", "slim,condition,pgd")

BATCH = 128
TARGET, MEMORY_TARGET = 1.10, 1.10
WIDTHS = (1.0, 0.75, 0.5)
ATTACK = {"eps": 0.3, "step_size": 0.1, "steps": 5, "norm": "Linf", "random_start": True}


def run_config(widths, device: str) -> dict:
    return {
        "seed": 0,
        "model": {"name": "resnet18"},
        "data": {"name": "mnist", "batch_size": BATCH, "n_train": BATCH * 4, "num_workers": 0},
        "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4,
                  "schedule": "constant", "warmup_epochs": 0, "device": device, "amp": False},
        "plugins": {"slim": {"widths": list(widths)}, "condition": {}, "pgd": dict(ATTACK)},
        "evaluate": {},
    }


class Side:
    """A run built by the real host, stepped the way ``normlab.train.train`` steps (``_paired.HostStep``)."""

    def __init__(self, widths, device: str):
        from normlab.config import parse_run
        from normlab.runner import prepare

        self.name = "OATS" if len(widths) > 1 else f"OAT@{widths[0]}"
        self.run = run = prepare(parse_run(run_config(widths, device), "benchmark:oats"), "benchmark:oats",
                                 quiet=True)
        run.build()
        loader = run.data.loader("train", BATCH, seed=0, num_workers=0, n=BATCH * 4, drop_last=True)
        self.step = HostStep(run, next(iter(loader)))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory(widths, device: str) -> float:
    """Peak memory of a first step beyond the built run's, in MB, measured in this (fresh) process: the
    step's graphs and attack, plus the gradients and momentum buffers it allocates (the same on every side).

    CPU: the peak resident set (VmHWM) is reset just before the step (Linux: ``5`` into
    /proc/self/clear_refs), and the peak during the step less the resident set before it is reported.
    """
    import torch

    side = Side(widths, device)
    if side.run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        side.step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    side.step()
    return (_status_kib("VmHWM") - before) / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (each: one step of every side)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # the subprocess: a comma list of widths
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result lines")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(memory([float(w) for w in args.memory_of.split(",")], args.device)))
        return 0
    try:
        t_start = time.perf_counter()
        sides = [Side(WIDTHS, args.device)] + [Side([w], args.device) for w in WIDTHS]
        if not args.quiet:
            print(f"oats benchmark: resnet18, batch {BATCH}, PGD-{ATTACK['steps']}, widths {WIDTHS}; "
                  f"{args.rounds} rounds, device {sides[0].run.device}, torch threads {torch.get_num_threads()}",
                  flush=True)
        for s in sides:  # warm-up
            s.step()
        times = {s.name: [] for s in sides}
        for r in range(args.rounds):
            for s in sides[r % len(sides):] + sides[: r % len(sides)]:
                t0 = time.perf_counter()
                s.step()
                times[s.name].append(time.perf_counter() - t0)
        oats = times["OATS"]
        sums = [sum(times[s.name][i] for s in sides[1:]) for i in range(args.rounds)]
        ratios = [a / b for a, b in zip(oats, sums)]
        if not args.quiet:
            for s in sides:
                print(f"  {s.name}: median {statistics.median(times[s.name]):.4f} s/step", flush=True)
            print(f"  ratio per round: {' '.join(f'{x:.3f}' for x in ratios)}; wall "
                  f"{time.perf_counter() - t_start:.0f} s", flush=True)
        print(f"oats: OATS {statistics.median(oats):.4f} s/step, sum of OAT steps at {WIDTHS} "
              f"{statistics.median(sums):.4f} s/step, ratio {statistics.median(ratios):.3f} (target <= {TARGET:.2f})",
              flush=True)
        del sides
        peaks = {}
        for widths in (WIDTHS, (1.0,)):
            cmd = [sys.executable, __file__, "--memory-of", ",".join(map(str, widths)), "--device", args.device]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peaks[widths] = float(out)
        print(f"oats memory: OATS step peak +{peaks[WIDTHS]:.0f} MB, full-width OAT step +{peaks[(1.0,)]:.0f} MB, "
              f"ratio {peaks[WIDTHS] / peaks[(1.0,)]:.3f} (target <= {MEMORY_TARGET:.2f})", flush=True)
    except Exception as e:  # a measurement: report and exit 0
        print(f"oats benchmark: failed: {type(e).__name__}: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
