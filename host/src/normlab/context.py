"""The conditioning context: per-forward state that plugin-added modules read.

Modules that plugins put into a model (routed norms, FiLM) never hold global
state: they read the active :class:`Context` with :func:`current`. The host
activates the step's context around each forward; plugins change fields for a
nested forward with ``ctx.using(route="adv")``.

Per-sample fields (``lam``, ``condition``, a per-sample ``route``) have the
batch as their first dimension; :meth:`Context.subset` selects samples from all
of them at once, so a plugin that forwards part of the batch keeps them aligned.
A one-row tensor (a test-time knob) stands for every sample and is kept as is.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator

import torch

__all__ = ["Context", "Routing", "current"]

_ACTIVE: contextvars.ContextVar["Context | None"] = contextvars.ContextVar("normlab_context", default=None)


class Routing:
    """Per-sample route indices, with the split computed once per batch.

    When the indices are sorted (samples of each route contiguous) a routed
    layer splits the batch with views; otherwise it permutes once into sorted
    order and back. Build one per batch and reuse it for every layer.
    """

    def __init__(self, index: torch.Tensor, names: tuple[str, ...]):
        index = index.long()
        self.names = tuple(names)
        self.index = index
        counts = torch.bincount(index.cpu(), minlength=len(names))
        self.counts = [int(c) for c in counts]
        if bool((index[1:] >= index[:-1]).all()) if index.numel() > 1 else True:
            self.perm = None
            self.inverse = None
        else:
            self.perm = torch.argsort(index, stable=True)
            self.inverse = torch.argsort(self.perm)

    def subset(self, sel: torch.Tensor) -> "Routing":
        return Routing(self.index[sel], self.names)

    def __len__(self) -> int:
        return self.index.numel()

    def __repr__(self) -> str:
        return f"Routing({dict(zip(self.names, self.counts))}, sorted={self.perm is None})"


@dataclasses.dataclass
class Context:
    """State of one training step or evaluation, read by modules during a forward.

    Fields read by host layers:

    - ``route``: which branch of a :class:`~normlab.layers.RoutedNorm` keyed on
      ``route`` to use: None (the first), a route name, or a :class:`Routing`
      for per-sample routes.
    - ``width``: the width factor read by norms keyed on ``width`` (slimmable).
    - ``condition``: a (N, D) tensor read by :class:`~normlab.layers.FiLM`; None
      means FiLM is the identity.
    - ``lam``: per-sample loss weight lambda (N,), or None.
    - ``adv_route``: the route adversarial forwards should use (None: unchanged).
    - ``perturb``: whether a feature perturbation (AdvBN) is active.
    - ``inner``: True in the forwards of an inner loop, an attack above all (pgd's and
      advbn's training-time attacks, the attack evaluators): the model is in eval mode with
      parameter gradients off there, though ``training`` stays True during training, so a
      training-only plugin (a feature augmentation, a regulariser) checks ``inner`` to skip them.
    - ``passes``: None, or a list of field overrides (``[{"width": 1.0}, {"width": 0.5}]``) set in
      ``on_batch``: the training step then runs the forward, every plugin's ``on_loss`` and the
      backward once per pass, under ``ctx.using(**overrides)``, before one optimizer step (slimmable
      training sums the losses of every width). Each pass's graph is freed before the next.
    - ``adaptive``: True while an adaptive attack (``adapt: adaptive``, docs/adaptive.md) calls
      ``on_domain`` before each forward of the attacked model, with that forward's input as the
      samples: a plugin adapts for that one forward, differentiably where it can, and writes no
      buffer.
    """

    run: Any = None
    training: bool = False
    epoch: int = 0
    step: int = 0
    route: Any = None
    width: Any = None
    condition: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    adv_route: Any = None
    perturb: bool = False
    inner: bool = False
    adaptive: bool = False
    passes: list[dict] | None = None
    features: dict = dataclasses.field(default_factory=dict)
    state: dict = dataclasses.field(default_factory=dict)

    _PER_SAMPLE = ("lam", "condition", "route")

    @contextlib.contextmanager
    def active(self) -> Iterator["Context"]:
        """Make this context the one :func:`current` returns inside the block."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @contextlib.contextmanager
    def using(self, **fields: Any) -> Iterator["Context"]:
        """Activate a copy of this context with some fields changed."""
        with dataclasses.replace(self, **fields).active() as ctx:
            yield ctx

    def set_route(self, index: torch.Tensor, names: tuple[str, ...]) -> None:
        """Set a per-sample route from integer indices into ``names``."""
        self.route = Routing(index, names)

    def subset(self, sel: torch.Tensor) -> "Context":
        """A copy whose per-sample fields keep only the samples ``sel`` selects."""
        changes = {}
        for f in self._PER_SAMPLE:
            v = getattr(self, f)
            if isinstance(v, Routing):
                changes[f] = v.subset(sel)
            elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
                changes[f] = v[sel]
        return dataclasses.replace(self, **changes)


def current() -> Context:
    """The active context, or a default one (route 0, no condition) outside any run."""
    ctx = _ACTIVE.get()
    return ctx if ctx is not None else _DEFAULT


_DEFAULT = Context()
