"""``clean``: accuracy on the unchanged test split."""

from __future__ import annotations

from ..train import evaluate_accuracy
from . import EvalSettings, Evaluator, test_loader


class CleanConfig(EvalSettings):
    pass


def clean(model, ctx, report, cfg: CleanConfig) -> None:
    run = ctx.run
    loader = test_loader(run, cfg)
    samples = next(iter(loader))[0]
    with run.domain("clean", samples, ctx):
        top1, top5 = evaluate_accuracy(run, loader, desc="clean", ctx=ctx)
    report.add("clean/acc", top1)
    if top5 is not None:
        report.add("clean/top5", top5)


EVALUATORS = [Evaluator("clean", CleanConfig, clean, "top-1 accuracy on the test split (top-5 above 10 classes)")]
