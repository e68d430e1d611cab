"""``sweep``: run evaluators once per value of a test-time knob or of a plugin setting.

Plugins declare the knobs they honour (``knobs = ("lam",)``); a knob is a field
of the evaluation :class:`~normlab.context.Context` that plugin modules read:
``lam`` (set as a one-row tensor, broadcast over the batch), ``width`` and
``route``. Keys are ``sweep/KNOB=VALUE/<evaluator key>``; a PNG plots each
accuracy against the knob and, when a clean and an adversarial accuracy are
both present, the standard-accuracy / robust-accuracy (SA-RA) curve.

Several context knobs at once: ``grid: {lam: [0, 0.4, 1], width: [0.5, 1.0]}`` instead of ``knob`` and
``values`` evaluates every combination (OATS: lambda and width chosen at test time). Keys are
``sweep/lam=V,width=W/<evaluator key>``; the plot draws the first knob along the x axis and one curve per
value of the others (an SA-RA curve per width).

Settings that plugins read at evaluation time (bnrect's ``n_samples``) are swept
the same way with ``knob: plugins.NAME.FIELD`` and plain values, or with
``knob: plugins.NAME`` and values that are mappings of fields (an ablation that
varies several fields: ``[{n_samples: 8}, {adapt: mean}, ...]``). Each value is
validated against the plugin's settings before anything is built, and the
plugin's settings are put back after the sweep. Keys are
``sweep/NAME.FIELD=VALUE/<evaluator key>``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from ..config import validate_section
from ..errors import UsageError
from ..plots import ATTACKS, save
from . import Evaluator, Report
from .settings import SweepConfig, nested_evaluators


def _plugin_variants(run, cfg: SweepConfig) -> list[tuple[str, Any]]:
    """Each value of a plugin knob as (label, the plugin's validated settings with that value)."""
    name = cfg.plugin
    if name not in run.enabled:
        raise UsageError(f"{run.source}: evaluate.sweep.knob: plugin {name!r} is not enabled in this run")
    base = run.plugin_config(name)
    if not hasattr(base, "model_dump"):
        raise UsageError(f"{run.source}: evaluate.sweep.knob: plugin {name!r} has no settings to vary")
    field = cfg.knob.split(".")[2] if cfg.knob.count(".") == 2 else None
    variants = []
    for i, value in enumerate(cfg.values):
        changes = {field: value} if field else value
        label = ",".join(f"{name}.{k}={v}" for k, v in changes.items())
        settings = validate_section(type(base), {**base.model_dump(), **changes}, run.source,
                                    f"evaluate.sweep.values[{i}]")
        variants.append((label, settings))
    return variants


def check(run, cfg: SweepConfig) -> None:
    """Before anything is built: the knob is declared by an enabled plugin; nested settings are valid."""
    declared = {k for n in run.enabled for k in run.plugins[n].knobs}
    if cfg.plugin is not None:
        cfg._variants = _plugin_variants(run, cfg)
    else:
        for knob in cfg.axes:
            if knob not in declared:
                where = "grid" if cfg.grid is not None else "knob"
                raise UsageError(f"{run.source}: evaluate.sweep.{where}: no enabled plugin declares knob {knob!r}"
                                 + (f" (declared: {', '.join(sorted(declared))})" if declared else ""))
    if cfg._parsed is None:
        nested_evaluators(cfg, run.source)
    _nested_checks(run, cfg, "check")


def check_model(run, cfg: SweepConfig) -> None:
    """Once the model is built: the nested evaluators' own model checks (divergence's layers)."""
    _nested_checks(run, cfg, "check_model")


def _nested_checks(run, cfg: SweepConfig, which: str) -> None:
    """Each nested evaluator's ``check`` or ``check_model``, as the host runs them for top-level evaluators
    (their settings name their own key, ``evaluate.sweep.evaluators.NAME``, in what they refuse)."""
    from . import EVALUATORS

    for name, settings in cfg._parsed.items():
        fn = getattr(EVALUATORS[name], which)
        if fn is not None:
            fn(run, settings)


def knob_value(knob: str, value: Any) -> Any:
    return torch.tensor([float(value)]) if knob == "lam" else value


def sweep(model, ctx, report, cfg: SweepConfig) -> None:
    from . import EVALUATORS

    run = ctx.run
    if cfg._parsed is None:
        check(run, cfg)
    rows = []
    for label, tick, group, sub_ctx, restore in _settings(ctx, cfg):
        sub = Report()
        try:
            for name, settings in cfg._parsed.items():
                run.log.info("sweep %s: %s", label, name)
                EVALUATORS[name].fn(model, sub_ctx, sub, settings)
        finally:
            restore()
        report.include(sub, f"sweep/{label}/")
        rows.append((tick, group, sub.metrics))
    if run.dir is not None:
        names = [k.removeprefix("plugins.") for k in cfg.axes]
        stem = "sweep_" + "_".join(names)
        report.plots[stem] = str(plot(names[0], rows, run.dir / "plots" / f"{stem}.png"))


def _settings(ctx, cfg: SweepConfig):
    """(key label, plot tick, plot group, context, restore) per value: a changed context, or the plugin's
    settings swapped in. A grid's first knob gives the ticks and the other knobs the groups (one curve each)."""
    if cfg.plugin is None:
        axes = cfg.axes
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values))
            sub_ctx = dataclasses.replace(ctx, **{k: knob_value(k, v) for k, v in point.items()})
            group = ",".join(f"{k}={v}" for k, v in list(point.items())[1:]) or None
            yield ",".join(f"{k}={v}" for k, v in point.items()), values[0], group, sub_ctx, _noop
        return
    run, name = ctx.run, cfg.plugin
    original = run.plugin_configs[name]
    one_field = cfg.knob.count(".") == 2
    for (label, settings), value in zip(cfg._variants, cfg.values):
        run.plugin_configs[name] = settings
        tick = value if one_field else label.replace(f"{name}.", "")
        yield label, tick, None, ctx, lambda: run.plugin_configs.__setitem__(name, original)


def _noop() -> None:
    return None


def plot(knob: str, rows: list[tuple[Any, str | None, dict]], path):
    """Each accuracy against the knob (one line per accuracy and group) and, with a clean and an attack
    accuracy, the SA-RA curve of each group (a grid's other knobs: one curve per width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_keys = [k for k in rows[0][2] if k.endswith("/acc") and k.count("/") == 1]
    adv = next((k for k in acc_keys if k.split("/")[0] in ATTACKS), None)
    sara = "clean/acc" in acc_keys and adv is not None
    groups = list(dict.fromkeys(g for _, g, _ in rows))
    xs = list(dict.fromkeys(str(v) for v, _, _ in rows))
    long_ticks = sum(len(x) for x in xs) > 40  # variants such as "n_samples=8": rotate, widen
    width = max(5.0, 0.5 * len(xs)) if long_ticks else 5.0
    fig, axes = plt.subplots(1, 2 if sara else 1, figsize=(width + (4 if sara else 0), 3.6 + long_ticks),
                             squeeze=False)
    ax = axes[0][0]
    for group in groups:
        part = [(str(v), m) for v, g, m in rows if g == group]
        for key in acc_keys:
            ax.plot([x for x, _ in part], [m[key] for _, m in part], marker="o",
                    label=key if group is None else f"{key} {group}")
    ax.set(xlabel=knob, ylabel="accuracy", title=f"accuracy by {knob}")
    if long_ticks:
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(groups) > 1 else None)
    if sara:
        ax = axes[0][1]
        for group in groups:
            part = [(v, m) for v, g, m in rows if g == group]
            sa, ra = [m["clean/acc"] for _, m in part], [m[adv] for _, m in part]
            ax.plot(sa, ra, marker="o", label=group)
            for (v, _), x, y in zip(part, sa, ra):
                ax.annotate(f"{knob}={v}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel="standard accuracy (SA)", ylabel=f"robust accuracy ({adv})", title="SA-RA trade-off")
        ax.grid(alpha=0.3)
        if groups != [None]:
            ax.legend(fontsize=8)
    return save(fig, path)


EVALUATORS = [Evaluator("sweep", sweep, "chosen evaluators once per value of a test-time knob",
                        check=check, check_model=check_model)]
