"""Evaluators and the report they fill.

The host's evaluators are a built-in plugin (``normlab.evaluators``) whose
``on_eval`` runs those named under ``evaluate:`` in the run file, each with its
own settings model. Plugins add metrics from their own ``on_eval``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from pydantic import Field

from .config import Strict
from .context import Context
from .manager import hookimpl
from .train import evaluate_accuracy

__all__ = ["Report", "EVALUATORS", "Evaluator", "CleanConfig"]


class Report:
    """Flat metrics with slash-separated keys (``clean/acc``), numbers only."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric {key!r} is not finite: {value}")
        self.metrics[key] = value

    def update(self, metrics: dict[str, float], prefix: str = "") -> None:
        for k, v in metrics.items():
            self.add(f"{prefix}{k}", v)


class EvalSettings(Strict):
    """Settings every evaluator accepts."""

    n_examples: int | None = Field(None, ge=1, description="evaluate on a fixed subset of this many test images")
    batch_size: int = Field(256, ge=1)


class CleanConfig(EvalSettings):
    pass


class Evaluator:
    """A named evaluator: its settings model and the function that runs it."""

    def __init__(self, name: str, config: type[Strict], fn: Callable[[Any, Context, Report, Any], None], doc: str):
        self.name, self.config, self.fn, self.doc = name, config, fn, doc


def _clean(model, ctx: Context, report: Report, cfg: CleanConfig) -> None:
    run = ctx.run
    loader = run.data.loader("test", cfg.batch_size, shuffle=False, n=cfg.n_examples)
    samples = next(iter(loader))[0]
    with run.domain("clean", samples, ctx):
        top1, top5 = evaluate_accuracy(run, loader, desc="clean", ctx=ctx)
    report.add("clean/acc", top1)
    if top5 is not None:
        report.add("clean/top5", top5)


EVALUATORS: dict[str, Evaluator] = {
    e.name: e for e in (
        Evaluator("clean", CleanConfig, _clean, "top-1 accuracy on the test split (top-5 above 10 classes)"),
    )
}


class BuiltinEvaluators:
    """The host's evaluators as a plugin, so they run through ``on_eval`` like any other."""

    @hookimpl
    def on_eval(self, model, ctx, report):
        for name, cfg in ctx.run.evaluators.items():
            ctx.run.log.info("evaluating: %s", name)
            EVALUATORS[name].fn(model, ctx, report, cfg)
