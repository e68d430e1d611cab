"""What the per-example intervals cost an evaluation (issue 14: at most 2% slower).

The same model (timm ``resnet18`` behind ``NormlabNet``, 10 classes, fixed weights) is evaluated on
the same images (the embedded MNIST test split at 32x32, 1,000 images, batch 256) by
``normlab.train.evaluate_accuracy``, which now keeps each image's correctness. Measured in one
process: the evaluation itself, and what the intervals add after it, as a corruptions-like report
does for 15 corruptions x 5 severities (75 :meth:`Report.accuracy` calls with their Wilson
intervals, 15 + 1 :meth:`Report.mean_accuracy` calls with their normal intervals, and writing all
outcomes to ``correct.safetensors``), set against 75 evaluations. Printed: seconds and the ratio.

Usage::

    .venv/bin/python benchmarks/intervals.py

Always exits 0: it is a measurement, not a test.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host" / "src"))


def main() -> None:
    import torch

    from normlab.config import parse_run
    from normlab.evals import Report
    from normlab.results import write_outcomes
    from normlab.runner import prepare
    from normlab.train import evaluate_accuracy

    torch.manual_seed(0)
    run = prepare(parse_run({"train": {"epochs": 0}}, "bench"), "bench", quiet=True)
    run.build()
    loader = run.data.loader("test", 256, shuffle=False)
    evaluate_accuracy(run, loader)  # warm-up
    t0 = time.perf_counter()
    scores = evaluate_accuracy(run, loader)
    one_eval = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = Report()
    names = [f"c{i}" for i in range(15)]
    for c in names:
        for s in range(1, 6):
            report.accuracy(f"corruptions/{c}/{s}/acc", scores.correct, scores.labels)
        report.mean_accuracy(f"corruptions/{c}/acc", [f"corruptions/{c}/{s}/acc" for s in range(1, 6)])
    report.mean_accuracy("corruptions/acc", [f"corruptions/{c}/acc" for c in names])
    with tempfile.TemporaryDirectory() as tmp:
        write_outcomes(Path(tmp), report.outcomes)
    added = time.perf_counter() - t0
    print(f"intervals: one evaluation of 1,000 images {one_eval:.3f} s; 75 of them {75 * one_eval:.2f} s; "
          f"intervals and outcomes for 75 sets + 16 averages {added:.4f} s; ratio {1 + added / (75 * one_eval):.4f} "
          f"(target <= 1.02)")


if __name__ == "__main__":
    main()
