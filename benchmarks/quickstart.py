"""The README's quickstart: its wall time and peak memory against its bounds, and this machine's step time.

The README quotes what ``normlab run examples/quickstart.yaml`` took where it was measured (about 40 s
and 1 GB on 2-core machines whose resnet18 step takes 0.2-1.1 s; 3 min 53 s on the slowest one seen,
whose step took 1.5 s, before small maps skipped their padding taps). The bounds printed here are the
ones no machine of this kind should cross: 5 minutes and 3 GB. Machines differ several-fold in speed, so
the bound lives here, as a measurement, and not in a test. Printed:

- the quickstart's wall time (the whole CLI process: imports, data, training, evaluation, writing
  the run directory), the training and evaluation seconds it records, its clean accuracy and the
  peak resident memory of the process;
- this machine's time for one plain training step of timm ``resnet18`` at 32x32, batch 128 (SGD,
  fp32, the median of ``--steps`` after two warm-up steps), so that the figures can be placed
  against other machines (the slowest one measured so far: 1.5 s per step).

Usage::

    .venv/bin/python benchmarks/quickstart.py           # about 1 minute on a fast 2-core machine, 3 on a slow one

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resnet18_step_seconds(steps: int) -> float:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-file", default=str(ROOT / "examples" / "quickstart.yaml"))
    p.add_argument("--steps", type=int, default=5, help="timed resnet18 steps for the machine's step time")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quickstart"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "normlab.cli", "run", args.run_file, "--out", str(out)],
                              capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
        if proc.returncode != 0:
            print(f"quickstart: failed with exit {proc.returncode}:\n{proc.stderr[-2000:]}")
            return
        results = json.loads((out / "results.json").read_text())
    timing, acc = results.get("timing", {}), results["metrics"]["clean/acc"]
    step = resnet18_step_seconds(args.steps)
    print(f"quickstart: {seconds:.1f} s wall (bound <= 300), train {timing.get('train', float('nan')):.1f} s, "
          f"eval {timing.get('eval', float('nan')):.1f} s; peak {peak_gb:.2f} GB (bound <= 3.0); "
          f"clean/acc {acc:.4f} (target >= 0.95); resnet18 32x32 batch-128 step {step:.3f} s on this machine")


if __name__ == "__main__":
    main()
