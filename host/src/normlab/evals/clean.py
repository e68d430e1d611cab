"""``clean``: accuracy on the unchanged test split."""

from __future__ import annotations

from ..train import domain_accuracy
from . import Evaluator, test_loader
from .settings import CleanConfig


def clean(model, ctx, report, cfg: CleanConfig) -> None:
    scores = domain_accuracy(ctx.run, test_loader(ctx.run, cfg), "clean", ctx)
    report.accuracy("clean/acc", scores.correct, scores.labels)
    if scores.correct5 is not None:
        report.accuracy("clean/top5", scores.correct5, scores.labels)


EVALUATORS = [Evaluator("clean", clean, "top-1 accuracy on the test split (top-5 above 10 classes)")]
