"""``sweep``: run evaluators once per value of a test-time knob.

Plugins declare the knobs they honour (``knobs = ("lam",)``); a knob is a field
of the evaluation :class:`~normlab.context.Context` that plugin modules read:
``lam`` (set as a one-row tensor, broadcast over the batch), ``width`` and
``route``. Keys are ``sweep/KNOB=VALUE/<evaluator key>``; a PNG plots each
accuracy against the knob and, when a clean and an adversarial accuracy are
both present, the standard-accuracy / robust-accuracy (SA-RA) curve.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from pydantic import Field, PrivateAttr, model_validator

from ..config import Strict, validate_section
from ..errors import UsageError
from . import Evaluator, Report

KNOBS = ("lam", "width", "route")
ATTACK_PREFIXES = ("autoattack", "pgd", "apgd", "apgd_dlr", "fgsm", "mifgsm", "cw", "square")


class SweepConfig(Strict):
    knob: str = Field(description=f"the context field to vary: one of {KNOBS}")
    values: list[Any] = Field(min_length=1)
    evaluators: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"clean": {}})
    _parsed: dict | None = PrivateAttr(None)  # the nested evaluators' validated settings

    @model_validator(mode="after")
    def _check(self):
        if self.knob not in KNOBS:
            raise ValueError(f"knob must be one of {KNOBS}, got {self.knob!r}")
        if "sweep" in self.evaluators:
            raise ValueError("a sweep cannot contain a sweep")
        if self.knob == "lam" and not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in self.values):
            raise ValueError("lam values must be numbers in [0, 1]")
        return self


def check(run, cfg: SweepConfig) -> None:
    """Before anything is built: the knob is declared by an enabled plugin; nested settings are valid."""
    from . import EVALUATORS  # complete once the package has been imported

    declared = {k for n in run.enabled for k in run.plugins[n].knobs}
    if cfg.knob not in declared:
        raise UsageError(f"{run.source}: evaluate.sweep.knob: no enabled plugin declares knob {cfg.knob!r}"
                         + (f" (declared: {', '.join(sorted(declared))})" if declared else ""))
    parsed = {}
    for name, settings in cfg.evaluators.items():
        if name not in EVALUATORS:
            raise UsageError(f"{run.source}: evaluate.sweep.evaluators.{name}: unknown evaluator")
        parsed[name] = validate_section(EVALUATORS[name].config, settings, run.source,
                                        f"evaluate.sweep.evaluators.{name}")
    cfg._parsed = parsed


def knob_value(knob: str, value: Any) -> Any:
    return torch.tensor([float(value)]) if knob == "lam" else value


def sweep(model, ctx, report, cfg: SweepConfig) -> None:
    from . import EVALUATORS

    run = ctx.run
    if cfg._parsed is None:
        check(run, cfg)
    parsed = cfg._parsed
    rows = []
    for value in cfg.values:
        sub = Report()
        sub_ctx = dataclasses.replace(ctx, **{cfg.knob: knob_value(cfg.knob, value)})
        for name, settings in parsed.items():
            run.log.info("sweep %s=%s: %s", cfg.knob, value, name)
            EVALUATORS[name].fn(model, sub_ctx, sub, settings)
        report.update(sub.metrics, prefix=f"sweep/{cfg.knob}={value}/")
        rows.append((value, sub.metrics))
    if run.dir is not None:
        report.plots[f"sweep_{cfg.knob}"] = str(plot(cfg.knob, rows, run.dir / "plots" / f"sweep_{cfg.knob}.png"))


def plot(knob: str, rows: list[tuple[Any, dict]], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_keys = [k for k in rows[0][1] if k.endswith("/acc") and k.count("/") == 1]
    adv = next((k for k in acc_keys if k.split("/")[0] in ATTACK_PREFIXES), None)
    sara = "clean/acc" in acc_keys and adv is not None
    fig, axes = plt.subplots(1, 2 if sara else 1, figsize=(9 if sara else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    xs = [str(v) for v, _ in rows]
    for key in acc_keys:
        ax.plot(xs, [m[key] for _, m in rows], marker="o", label=key)
    ax.set(xlabel=knob, ylabel="accuracy", title=f"accuracy by {knob}")
    ax.grid(alpha=0.3)
    ax.legend()
    if sara:
        ax = axes[0][1]
        sa, ra = [m["clean/acc"] for _, m in rows], [m[adv] for _, m in rows]
        ax.plot(sa, ra, marker="o")
        for (v, _), x, y in zip(rows, sa, ra):
            ax.annotate(f"{knob}={v}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="standard accuracy (SA)", ylabel=f"robust accuracy ({adv})", title="SA-RA trade-off")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


EVALUATORS = [Evaluator("sweep", SweepConfig, sweep, "chosen evaluators once per value of a test-time knob",
                        check=check)]
