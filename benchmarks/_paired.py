"""What the paired benchmarks share: the summary they print (the median of per-pair ratios, and how they
spread), and one host training step on a fixed batch."""

from __future__ import annotations

import statistics
import time


def paired_ratio(num: list[float], den: list[float], t_start: float) -> tuple[float, str]:
    """(median of num[i] / den[i], a line with the quartiles, the ratio of medians and of totals, and
    the wall time since ``t_start``)."""
    ratios = [n / d for n, d in zip(num, den)]
    ratio = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
    line = (f"{len(ratios)} pairs; ratio quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}; ratio of medians "
            f"{statistics.median(num) / statistics.median(den):.3f}; ratio of totals {sum(num) / sum(den):.3f}; "
            f"wall {time.perf_counter() - t_start:.0f} s")
    return ratio, line


class HostStep:
    """A training step of the built ``run`` on the fixed batch ``items``, as :func:`normlab.train.train` takes
    one: :func:`normlab.train.step_backward` (on_batch, each pass's forward, loss terms and backward), the
    optimizer's step, the finiteness check; synchronised on CUDA so that a clock around it is the step's."""

    def __init__(self, run, items):
        from normlab.train import Finite, build_optimizer

        run.train_mode()
        self.run, self.items, self.step_no, self.finite = run, items, 0, Finite()
        self.opt = build_optimizer(run.trainable_parameters(), run.config.train)

    def __call__(self) -> None:
        import torch

        from normlab.context import Context
        from normlab.train import as_batch, step_backward

        run, i = self.run, self.step_no
        step_backward(run, as_batch(run, self.items), Context(run=run, training=True, step=i), 0, i, i, self.finite)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.finite.check()
        self.step_no += 1
        if run.device.type == "cuda":
            torch.cuda.synchronize()
