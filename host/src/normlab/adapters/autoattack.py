"""Adapter: the original AutoAttack API on top of the registry's ``pyautoattack``.

The original AutoAttack (Croce & Hein) is published on PyPI as ``pyautoattack``
(module ``pyautoattack``), whose API differs from the original ``autoattack``
module that robustbench 1.1.1 imports:

- constructor: keyword-only ``attacks=`` instead of ``attacks_to_run=``; no
  ``verbose``, ``is_tf_model`` or ``log_path`` arguments;
- ``run_standard_evaluation(x, y, batch_size=...)`` instead of ``bs=...``, and
  it always returns ``(x_adv, y_adv)`` where the original returns ``x_adv``
  (or the pair with ``return_labels=True``).

:class:`AutoAttack` accepts the original signature and forwards to
pyautoattack; the attacks themselves are pyautoattack's, unchanged.
:func:`install_module_alias` registers it as the module ``autoattack`` (and
``autoattack.state``) when no real ``autoattack`` module is installed, so that
``import robustbench`` works.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pyautoattack
import pyautoattack.state

__all__ = ["AutoAttack", "install_module_alias"]


class AutoAttack(pyautoattack.AutoAttack):
    """pyautoattack's AutoAttack with the original package's constructor and method signatures."""

    def __init__(self, model, norm: str = "Linf", eps: float = 0.3, seed=None, verbose: bool = True,
                 attacks_to_run=(), version: str = "standard", is_tf_model: bool = False, device="cuda",
                 log_path=None):
        if is_tf_model:
            raise NotImplementedError("normlab's AutoAttack adapter supports PyTorch models only")
        super().__init__(model, attacks=list(attacks_to_run) or None, device=device, eps=eps, norm=norm,
                         seed=seed, version=version)
        self.verbose = verbose

    def run_standard_evaluation(self, x_orig, y_orig, bs: int = 250, return_labels: bool = False,
                                state_path=None):
        x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
        return (x_adv, y_adv) if return_labels else x_adv


def install_module_alias() -> None:
    """Make ``import autoattack`` resolve to this adapter unless a real ``autoattack`` exists."""
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    module = types.ModuleType("autoattack", __doc__)
    module.AutoAttack = AutoAttack
    module.state = pyautoattack.state
    module.__path__ = []  # a package, so `autoattack.state` can be imported
    sys.modules["autoattack"] = module
    sys.modules["autoattack.state"] = pyautoattack.state
