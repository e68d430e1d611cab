"""normlab's plugin catalogue and the resolution of run-file plugin names.

The catalogue knows every plugin the project publishes, installed or not, so
that a run file naming ``advbn`` on a machine without it can say which
distribution to install. Resolution turns the names a run file lists into the
ordered list of plugins to enable, checking what each installed plugin declares
it requires and conflicts with. Nothing here imports torch: resolution runs
before anything is built.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["CATALOGUE", "Entry", "PluginSpec", "ResolutionError", "resolve", "did_you_mean"]


@dataclass(frozen=True)
class Entry:
    """A plugin the project publishes: its run-file name and distribution."""

    name: str
    distribution: str
    summary: str


CATALOGUE: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("advbn", "normlab-advbn", "AdvBN: adversarial feature-statistic perturbation with an auxiliary BN"),
        Entry("augmix", "normlab-augmix", "AugMix views with the Jensen-Shannon consistency loss"),
        Entry("bnrect", "normlab-bnrect", "BN rectification: re-estimate BN statistics per test domain"),
        Entry("condition", "normlab-condition", "OAT conditioning: dual BN + FiLM on the loss weight lambda"),
        Entry("pgd", "normlab-pgd", "PGD adversarial training, lambda-weighted (TRADES optional)"),
        Entry("nf", "normlab-nf", "Normalizer-free conversion of the backbone (NoFrost)"),
        Entry("slim", "normlab-slim", "Slimmable widths with switchable BN (OATS)"),
        Entry("tensorboard", "normlab-tensorboard", "TensorBoard event files of a run"),
        Entry("mlflow", "normlab-mlflow", "An MLflow run per normlab run"),
    )
}


@dataclass(frozen=True)
class PluginSpec:
    """What an installed plugin declares about itself."""

    name: str
    requires: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    distribution: str | None = None
    after: tuple[str, ...] = ()  # plugins that, when enabled, must be listed before this one
    error: str | None = None  # set when the plugin is installed but failed to import
    extra: dict = field(default_factory=dict, compare=False)


class ResolutionError(ValueError):
    """A run file names plugins that cannot be enabled together; the message is one line."""


def did_you_mean(name: str, candidates: Sequence[str]) -> str:
    """Return ' (did you mean X?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve(requested: Sequence[str], installed: Mapping[str, PluginSpec]) -> list[str]:
    """Resolve run-file plugin names to the ordered list of plugins to enable.

    The order is the run file's order (chained hooks run in it). Raises
    ResolutionError, with a one-line message, for: a duplicate name; a name
    that is neither installed nor in the catalogue (with a "did you mean");
    a catalogued name that is not installed (with the distribution to install);
    an installed plugin that failed to import; a missing requirement; any
    declared conflict, in either direction; and a plugin listed before one it
    must follow (its ``after``).
    """
    seen: set[str] = set()
    for name in requested:
        if name in seen:
            raise ResolutionError(f"plugin {name!r} is listed twice")
        seen.add(name)
        if name not in installed:
            if name in CATALOGUE:
                dist = CATALOGUE[name].distribution
                raise ResolutionError(
                    f"plugin {name!r} is not installed; install it with: pip install {dist}"
                )
            hint = did_you_mean(name, [*installed, *CATALOGUE])
            raise ResolutionError(f"unknown plugin {name!r}{hint}")
        if installed[name].error:
            raise ResolutionError(f"plugin {name!r} is installed but failed to load: {installed[name].error}")
    enabled = list(requested)
    for name in enabled:
        spec = installed[name]
        for req in spec.requires:
            if req not in seen:
                raise ResolutionError(f"plugin {name!r} requires plugin {req!r}; add it to `plugins`")
        for other in enabled:
            if other != name and (other in spec.conflicts or name in installed[other].conflicts):
                a, b = sorted((name, other))
                why = installed[name].extra.get("conflict_reasons", {}).get(other) or installed[
                    other
                ].extra.get("conflict_reasons", {}).get(name)
                raise ResolutionError(
                    f"plugins {a!r} and {b!r} conflict" + (f": {why}" if why else "")
                )
        for prior in spec.after:
            if prior in seen and enabled.index(prior) > enabled.index(name):
                raise ResolutionError(f"plugin {name!r} must be listed after {prior!r} in `plugins`")
    return enabled
