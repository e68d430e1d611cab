"""Evaluators and the report they fill.

The host's evaluators are a built-in plugin (``normlab.evaluators``) whose
``on_eval`` runs those named under ``evaluate:`` in the run file, in that
order, each with its own settings model. The settings live in
:mod:`normlab.evals.settings`, which imports no torch (the CLI checks a run
file against them before torch is loaded); every other module in this package
lists its evaluators in a module-level ``EVALUATORS``, and importing this
package imports none of them until ``EVALUATORS`` is first used. Plugins add
metrics from their own ``on_eval``.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from typing import TYPE_CHECKING, Any, Callable

from ..config import Strict
from ..manager import hookimpl
from .settings import SETTINGS, EvalSettings

if TYPE_CHECKING:
    from ..context import Context

__all__ = ["Report", "Evaluator", "EvalSettings", "EVALUATORS", "BuiltinEvaluators", "test_loader"]


class Report:
    """Flat metrics with slash-separated keys (``clean/acc``), numbers only.

    ``records`` holds what is not a number but belongs in results.json (which
    samples a plugin adapted on, ...); ``plots`` maps names to PNG paths.
    """

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.records: dict[str, object] = {}
        self.plots: dict[str, str] = {}

    def add(self, key: str, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric {key!r} is not finite: {value}")
        self.metrics[key] = value

    def update(self, metrics: dict[str, float], prefix: str = "") -> None:
        for k, v in metrics.items():
            self.add(f"{prefix}{k}", v)


class Evaluator:
    """A named evaluator: ``fn(model, ctx, report, settings)``; its settings model is ``SETTINGS[name]``.

    ``check(run, settings)``, when given, runs before anything is built or
    trained and raises UsageError for settings that depend on the run (a knob
    no enabled plugin declares, ...).
    """

    def __init__(self, name: str, fn: Callable[[Any, Context, Report, Any], None], doc: str,
                 check: Callable[[Any, Any], None] | None = None):
        self.config: type[Strict] = SETTINGS[name]
        self.name, self.fn, self.doc, self.check = name, fn, doc, check


def test_loader(run, cfg: EvalSettings, shuffle: bool = False):
    """The test split as an evaluator's settings ask (its subset size and batch size)."""
    return run.data.loader("test", cfg.batch_size, shuffle=shuffle, n=cfg.n_examples)


def _collect() -> dict[str, Evaluator]:
    found: dict[str, Evaluator] = {}
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name == "settings":
            continue
        for ev in importlib.import_module(f"{__name__}.{mod.name}").EVALUATORS:
            if ev.name in found:
                raise RuntimeError(f"evaluator {ev.name!r} is defined twice")
            found[ev.name] = ev
    return found


def _evaluators() -> dict[str, Evaluator]:
    """``EVALUATORS``, built on first use (each evaluator module imports torch)."""
    if "EVALUATORS" not in globals():
        found = _collect()
        if set(found) != set(SETTINGS):
            raise RuntimeError(f"evaluators without settings or settings without an evaluator: "
                               f"{sorted(set(found) ^ set(SETTINGS))}")
        globals()["EVALUATORS"] = found
    return globals()["EVALUATORS"]


def __getattr__(name: str):
    if name == "EVALUATORS":
        return _evaluators()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BuiltinEvaluators:
    """The host's evaluators as a plugin, so they run through ``on_eval`` like any other."""

    @hookimpl
    def on_eval(self, model, ctx, report):
        evaluators = _evaluators()
        for name, cfg in ctx.run.evaluators.items():
            ctx.run.log.info("evaluating: %s", name)
            evaluators[name].fn(model, ctx, report, cfg)
