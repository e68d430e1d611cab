"""Padding taps: a host training step with every convolution skipping the taps that meet only padding,
against the same step computing every tap (normlab.layers.padding_taps_kept), in one process.

Two runs built by the real host (``prepare`` + ``Run.build``) from the same seed, so the same weights:
timm ``--model`` (resnet18) on the embedded MNIST at ``--image-size`` (32: an ImageNet stem leaves
layer4 at 1x1), batch ``--batch``, SGD, plain CE; ``--nf`` adds the nf plugin (timm's NF counterpart or
the in-place conversion to timm's ScaledStdConv2d, as examples/nofrost.yaml trains). Each side takes
host training steps (normlab.train's loop body and the optimizer step) on one fixed batch; the sides
alternate, the order flipping every repetition. Before timing, the eval-mode logits of the batch with and
without the crop are compared (float rounding: the same sums without their zero terms; a parameter
comparison after a training step is no check at 32x32 on MNIST: at initialisation the ImageNet stem's
skip path brings layer4 only the images' all-black corner, so train-mode BN there divides rounding noise
by sqrt(eps)). Printed: each side's median step and the median of the per-pair ratios
cropped / every tap.

Usage::

    .venv/bin/python benchmarks/taps.py --threads 1 --clock cpu            # resnet18, 32x32
    .venv/bin/python benchmarks/taps.py --threads 1 --clock cpu --nf       # the quick NoFrost model
    .venv/bin/python benchmarks/taps.py --threads 1 --clock cpu --image-size 24

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def build(args):
    from normlab.config import parse_run
    from normlab.runner import prepare

    cfg = parse_run({
        "seed": 0, "model": {"name": args.model},
        "data": {"name": "mnist", "batch_size": args.batch, "num_workers": 0, "image_size": args.image_size},
        "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant",
                  "device": args.device},
        "plugins": {"nf": {}} if args.nf else {}, "evaluate": {}}, "benchmark")
    run = prepare(cfg, "benchmark", quiet=True)
    run.build()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--nf", action="store_true", help="with the nf plugin (normalizer-free, as NoFrost trains)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process time (one thread)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import torch

    from _paired import HostStep, paired_ratio
    from normlab.layers import padding_taps_kept

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    cropped, every = build(args), build(args)
    items = next(iter(cropped.data.loader("train", args.batch)))

    def step(name: str) -> float:
        start = clock()
        if name == "every tap":
            with padding_taps_kept(every.model):
                sides[name]()
        else:
            sides[name]()
        return clock() - start

    x = items[0].to(cropped.device)
    if cropped.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the same weights give the same logits (eval mode: the running statistics)
        cropped.model.eval()
        a = cropped.model(x)
        with padding_taps_kept(cropped.model):
            b = cropped.model(x)
    print(f"taps: {args.model}{' (nf)' if args.nf else ''} at {args.image_size}x{args.image_size}, batch "
          f"{args.batch}, {args.device}, channels-last {cropped.channels_last}; logits with and without the "
          f"crop differ by at most {float((a - b).abs().max()):.1e} (largest logit {float(a.abs().max()):.2f})")
    sides = {"cropped": HostStep(cropped, items), "every tap": HostStep(every, items)}  # train mode again
    for name in sides:  # warm-up
        step(name)
    times = {name: [] for name in sides}
    t0 = time.perf_counter()
    for i in range(args.steps):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            times[name].append(step(name))
    ratio, line = paired_ratio(times["cropped"], times["every tap"], t0)
    print(f"taps: cropped {statistics.median(times['cropped']):.4f} s/step, every tap "
          f"{statistics.median(times['every tap']):.4f} s/step, ratio {ratio:.3f} ({line})")


if __name__ == "__main__":
    main()
