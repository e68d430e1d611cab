"""normlab: a plugin host for robustness methods that act on normalization layers.

Python API (the CLI is a thin layer over it)::

    import normlab
    result = normlab.run("examples/quickstart.yaml", out="runs/quick")
    result.metrics["clean/acc"]
    normlab.evaluate("runs/quick", overrides=["evaluate.clean.n_examples=200"])

Plugin authors import :data:`hookimpl` and the building blocks in
:mod:`normlab.layers` and :mod:`normlab.context`.
"""

__version__ = "0.1.0"

from .manager import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl", "run", "evaluate", "load_model", "UsageError", "RunFailure"]


def __getattr__(name):  # the API pulls in torch and timm: import it on first use
    if name in ("run", "evaluate", "load_model"):
        from . import runner as _run

        return getattr(_run, name)
    if name in ("UsageError", "RunFailure"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")
