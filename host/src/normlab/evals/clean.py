"""``clean``: accuracy on the unchanged test split."""

from __future__ import annotations

from ..train import domain_accuracy
from . import Evaluator, test_loader
from .settings import CleanConfig


def clean(model, ctx, report, cfg: CleanConfig) -> None:
    top1, top5 = domain_accuracy(ctx.run, test_loader(ctx.run, cfg), "clean", ctx)
    report.add("clean/acc", top1)
    if top5 is not None:
        report.add("clean/top5", top5)


EVALUATORS = [Evaluator("clean", clean, "top-1 accuracy on the test split (top-5 above 10 classes)")]
