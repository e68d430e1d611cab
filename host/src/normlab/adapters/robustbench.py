"""Adapter: importing robustbench 1.1.1 as installed from the registry.

robustbench 1.1.1 pins ``timm==1.0.9`` (normlab installs it with ``--no-deps``
and uses a newer timm, see requirements-dev.txt), imports a module
``autoattack`` that no registry package provides under that name (see
:mod:`normlab.adapters.autoattack`), and needs ``pkg_resources`` (setuptools
< 81). :func:`import_robustbench` installs the ``autoattack`` alias and imports
the package, turning a missing piece into one clear error.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


class RobustbenchUnavailable(ImportError):
    """robustbench (or what it imports) is missing; the message says what to install."""


def import_robustbench() -> ModuleType:
    """Import and return the ``robustbench`` package, adapted; raise RobustbenchUnavailable otherwise."""
    try:
        from .autoattack import install_module_alias

        install_module_alias()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources' deprecation warning
            return importlib.import_module("robustbench")
    except ImportError as e:
        raise RobustbenchUnavailable(
            f"robustbench cannot be imported ({type(e).__name__}: {e}); install it with "
            f"`pip install --no-deps robustbench==1.1.1` plus pyautoattack, geotorch, torchdiffeq, gdown==5.1.0 "
            f"and setuptools<81 (see requirements-dev.txt)"
        ) from e
