"""Adaptive attacks: the model as an attacker of a test-time-adapting model must see it.

A static attack (``adapt: static``, the default) adapts the model once to the
domain's unlabeled samples (``on_domain``) and attacks the adapted model as a
fixed function. An adaptive attack (``adapt: adaptive``) attacks :class:`Adaptive`
instead: every forward first adapts the model to that forward's own input
(``on_domain`` with ``ctx.adaptive``; bnrect re-estimates its statistics from
the attacked batch, differentiably) and undoes it afterwards, so the attacker's
gradient runs through the adaptation. A discrete choice (AdvBN's ``route:
auto``) has no gradient: plugins name their choices in ``on_choices`` and the
attack runs once per combination of values fixed in the context. The static
attack's images (crafted on the model adapted once) are one more candidate: an
exact gradient through the adaptation is not always the best direction (on
bnrect models PGD-CE transferred from the static model beats it). Per batch
the candidate that the freely adapting model gets most wrong is kept.
docs/adaptive.md says when each evaluation is the right one.
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn

from ..context import Context, current

__all__ = ["Adaptive", "fixings"]


class Adaptive(nn.Module):
    """``model`` adapting to the input of each forward: ``on_domain(domain, samples=x)`` with
    ``ctx.adaptive`` (and the ``fixed`` context fields) around ``model(x)``, undone afterwards.

    Built in eval mode (torchattacks restores the mode it found). With no plugin adapting it
    computes exactly what ``model`` does.
    """

    def __init__(self, model: nn.Module, run: Any, domain: str = "clean", fixed: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.run, self.domain, self.fixed = run, domain, dict(fixed or {})
        self.train(False)

    def forward(self, x):
        outer = current()  # the evaluator's context (inner=True inside an attack)
        if outer.run is None:  # called outside any evaluation
            outer = Context(run=self.run)
        with outer.using(adaptive=True, **self.fixed) as ctx:
            with self.run.domain(self.domain, x, ctx):
                return self.model(x)

    def extra_repr(self) -> str:
        return f"domain={self.domain!r}, fixed={self.fixed}"


def fixings(run: Any, ctx: Any) -> list[dict[str, Any]]:
    """Every combination of the enabled plugins' discrete choices (``on_choices``); ``[{}]`` if none."""
    choices: dict[str, list] = {}
    for found in run.hooks.call("on_choices", ctx=ctx):
        for field, values in found.items():
            choices[field] = list(dict.fromkeys([*choices.get(field, []), *values]))
    fields = list(choices)
    return [dict(zip(fields, combo)) for combo in itertools.product(*(choices[f] for f in fields))]
