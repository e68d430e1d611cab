"""Evaluators and the report they fill.

The host's evaluators are a built-in plugin (``normlab.evaluators``) whose
``on_eval`` runs those named under ``evaluate:`` in the run file, in that
order, each with its own settings model. The settings live in
:mod:`normlab.evals.settings`, which imports no torch (the CLI checks a run
file against them before torch is loaded); every other module in this package
but :mod:`.adaptive` (the attacks' helper) lists its evaluators in a
module-level ``EVALUATORS``, and importing this
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

__all__ = ["Report", "Outcome", "Evaluator", "EvalSettings", "EVALUATORS", "BuiltinEvaluators", "test_loader"]


class Outcome:
    """Per-example result behind one accuracy: ``scores`` (1.0 / 0.0 per example, or for an average of
    accuracies the fraction of its parts that got the example right), ``examples`` (which examples:
    :func:`normlab.stats.examples_id`) and, for an average, the keys it averages (``of``)."""

    def __init__(self, scores, examples: str, of: tuple[str, ...] = ()):
        self.scores, self.examples, self.of = scores, examples, tuple(of)

    @property
    def binary(self) -> bool:
        return not self.of


class Report:
    """Flat metrics with slash-separated keys (``clean/acc``), numbers only.

    Accuracies measured on examples are added with :meth:`accuracy` (or :meth:`mean_accuracy` for an
    average of such accuracies over the same examples): besides the value, the report keeps
    ``<key>/ci_low`` and ``<key>/ci_high`` (a 95% interval over the examples, see :mod:`normlab.stats`)
    and the per-example outcome in ``outcomes`` (stored in the run directory's ``correct.safetensors``,
    which ``normlab compare`` pairs). ``records`` holds what is not a number but belongs in
    results.json (which samples a plugin adapted on, ...); ``plots`` maps names to PNG paths.
    """

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.records: dict[str, object] = {}
        self.plots: dict[str, str] = {}
        self.outcomes: dict[str, Outcome] = {}

    def add(self, key: str, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric {key!r} is not finite: {value}")
        self.metrics[key] = value

    def update(self, metrics: dict[str, float], prefix: str = "") -> None:
        for k, v in metrics.items():
            self.add(f"{prefix}{k}", v)

    def accuracy(self, key: str, correct, labels) -> float:
        """Add the accuracy of per-example ``correct`` (bools, evaluation order) on examples with ``labels``,
        its Wilson interval, and the outcome; return the accuracy."""
        import numpy as np

        from ..stats import examples_id, wilson

        correct = np.asarray(_numpy(correct), dtype=bool).reshape(-1)
        n, k = correct.size, int(correct.sum())
        if n == 0:
            raise ValueError(f"accuracy {key!r} over no examples")
        self.add(key, k / n)
        lo, hi = wilson(k, n)
        self.add(f"{key}/ci_low", lo)
        self.add(f"{key}/ci_high", hi)
        self.outcomes[key] = Outcome(correct.astype(np.float64), examples_id(_numpy(labels)))
        return k / n

    def proportion(self, key: str, value: float, n: int) -> None:
        """Add an accuracy known only as a fraction of ``n`` examples (robustbench's benchmark() returns no
        per-example result) with its Wilson interval; nothing for ``normlab compare`` to pair."""
        from ..stats import wilson

        self.add(key, value)
        lo, hi = wilson(round(value * n), n)
        self.add(f"{key}/ci_low", lo)
        self.add(f"{key}/ci_high", hi)

    def mean_accuracy(self, key: str, keys: list[str]) -> float:
        """Add the mean of accuracies already in the report. Over the same examples it is the mean of the
        per-example scores and gets a normal interval over examples (Wilson's where every score is 0 or 1: one
        part, or parts that agree on every example); otherwise only the mean is added."""
        import numpy as np

        from ..stats import mean_interval, right_or_wrong, wilson

        mean = float(np.mean([self.metrics[k] for k in keys]))
        parts = [self.outcomes.get(k) for k in keys]
        if all(parts) and len({p.examples for p in parts}) == 1:
            scores = np.mean([p.scores for p in parts], axis=0)
            self.add(key, float(scores.mean()))
            lo, hi = wilson(int(scores.sum()), scores.size) if right_or_wrong(scores) else mean_interval(scores)
            self.add(f"{key}/ci_low", lo)
            self.add(f"{key}/ci_high", hi)
            self.outcomes[key] = Outcome(scores, parts[0].examples, tuple(keys))
            return self.metrics[key]
        self.add(key, mean)
        return mean

    def include(self, other: Report, prefix: str) -> None:
        """Another report's metrics and outcomes under ``prefix`` (``sweep/lam=0.5/``, ``NAME/``)."""
        self.update(other.metrics, prefix)
        for k, o in other.outcomes.items():
            self.outcomes[f"{prefix}{k}"] = Outcome(o.scores, o.examples, tuple(f"{prefix}{p}" for p in o.of))


def _numpy(values):
    """A tensor (any device) or array-like as a numpy array."""
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return values


class Evaluator:
    """A named evaluator: ``fn(model, ctx, report, settings)``; its settings model is ``SETTINGS[name]``.

    ``check(run, settings)``, when given, runs before anything is built or
    trained and raises UsageError for settings that depend on the run (a knob
    no enabled plugin declares, ...). ``check_model(run, settings)`` runs once
    the model is built, before the run directory is written, for settings that
    name parts of the model (layers).
    """

    def __init__(self, name: str, fn: Callable[[Any, Context, Report, Any], None], doc: str,
                 check: Callable[[Any, Any], None] | None = None,
                 check_model: Callable[[Any, Any], None] | None = None):
        self.config: type[Strict] = SETTINGS[name]
        self.name, self.fn, self.doc, self.check, self.check_model = name, fn, doc, check, check_model


def examples(run, cfg: EvalSettings, total: int | None = None, what: str = "the test split") -> int:
    """How many images an evaluator's settings give: ``n_examples``, at most the ``total`` that ``what`` holds
    (default: the run's test split); logged when it is less than asked, so a run.yaml that asks for more is not
    read as what ran."""
    total = len(run.data.test) if total is None else total
    told = run.__dict__.setdefault("_told_n_examples", set())  # once per evaluator, not once per domain
    if cfg.n_examples is not None and cfg.n_examples > total and (cfg.key, what) not in told:
        told.add((cfg.key, what))
        run.log.warning("%s.n_examples: %d asked, but %s has %d images: all %d are evaluated",
                        cfg.key, cfg.n_examples, what, total, total)
    return min(cfg.n_examples or total, total)


def test_loader(run, cfg: EvalSettings, shuffle: bool = False):
    """The test split as an evaluator's settings ask (its subset size and batch size)."""
    return run.data.loader("test", cfg.batch_size, shuffle=shuffle, n=examples(run, cfg))


def _collect() -> dict[str, Evaluator]:
    found: dict[str, Evaluator] = {}
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name in ("settings", "adaptive"):  # no evaluators there
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
        import time

        evaluators, cost = _evaluators(), ctx.run.cost
        for name, cfg in ctx.run.evaluators.items():
            ctx.run.log.info("evaluating: %s", name)
            t0 = time.perf_counter()
            evaluators[name].fn(model, ctx, report, cfg)
            cost[f"eval/{name}/seconds"] = seconds = time.perf_counter() - t0
            evaluated = report.outcomes.get(f"{name}/acc")
            if evaluated is not None:  # per test image of the evaluator's subset (all its domains together)
                cost[f"eval/{name}/seconds_per_image"] = seconds / len(evaluated.scores)
