"""Plugin discovery (entry points), validation, and hook calls that name the plugin.

Plugins are found through the entry-point group ``normlab``; the entry-point
name is the plugin's run-file name. ``NORMLAB_LOAD_PLUGINS`` (a comma list;
empty for none) restricts which entry points are loaded at all, as in
datasette and llm. A plugin that fails to import, or whose hook
implementations do not match the specifications, is kept in the listing with
its error instead of breaking the listing; naming it in a run file is an error.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import logging
import os
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .errors import RunFailure, UsageError

__all__ = ["hookimpl", "PluginInfo", "discover", "refuse_excluded", "Hooks", "HOOKS", "ENV_VAR", "GROUP"]

GROUP = "normlab"
ENV_VAR = "NORMLAB_LOAD_PLUGINS"
hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)
log = logging.getLogger("normlab")

# hooks whose implementations each receive the previous one's result, and which argument carries it
CHAINED = {"on_model": "model", "on_batch_norm": "module", "on_feature": "feature", "on_batch": "batch"}
#: every hook, in the order a run reaches them
HOOKS = ("on_model", "on_batch_norm", "on_feature", "on_batch", "on_loss", "on_domain", "on_choices", "on_epoch",
         "on_eval", "on_log")


def _expected_returns() -> dict[str, tuple[str, Callable[[Any, dict], str | None]]]:
    """What each hook may return besides None, and a check that describes a value it refuses (None: fine).
    Imported on first use: torch is not needed to list plugins."""
    import torch

    from .data import Batch

    def kind(*types):
        return lambda v, kw: None if isinstance(v, types) else type(v).__name__

    def feature(v, kw):
        if not isinstance(v, torch.Tensor):
            return type(v).__name__
        if v.shape != kw["feature"].shape:
            return f"a tensor of shape {tuple(v.shape)} for layer {kw['name']} (its output: " \
                   f"{tuple(kw['feature'].shape)})"
        return None

    return {
        "on_model": ("a torch.nn.Module (the backbone)", kind(torch.nn.Module)),
        "on_batch_norm": ("a torch.nn.Module (the replacement layer)", kind(torch.nn.Module)),
        "on_feature": ("a torch.Tensor of the feature's shape (the replacement feature)", feature),
        "on_batch": ("a normlab.data.Batch", kind(Batch)),
        "on_domain": ("a zero-argument callable that undoes the adaptation",
                      lambda v, kw: None if callable(v) else type(v).__name__),
        "on_choices": ("a dict mapping a context field to a non-empty list of values",
                       lambda v, kw: None if _choices(v) else type(v).__name__),
    }


def _choices(value: Any) -> bool:
    from .context import Context

    fields = set(Context.__dataclass_fields__)
    return isinstance(value, dict) and all(isinstance(k, str) and k in fields and isinstance(v, (list, tuple)) and v
                                           for k, v in value.items())


@dataclasses.dataclass
class PluginInfo:
    """An installed plugin as discovered: what ``normlab plugins`` lists."""

    name: str
    plugin: Any = None
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    hooks: list[str] = dataclasses.field(default_factory=list)
    requires: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    conflict_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    after: tuple[str, ...] = ()
    knobs: tuple[str, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name, "distribution": self.distribution, "version": self.version, "package": self.module,
            "hooks": self.hooks, "requires": list(self.requires), "conflicts": list(self.conflicts), "after": list(self.after),
            "knobs": list(self.knobs), "error": self.error,
        }


def allowed_names() -> set[str] | None:
    """Names allowed by NORMLAB_LOAD_PLUGINS, or None when it is unset (load all)."""
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _validate(name: str, plugin: Any) -> list[str]:
    """Register ``plugin`` alone against the hook specs; return its hook names or raise."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name=name)
    pm.check_pending()
    callers = pm.get_hookcallers(plugin) or ()
    for caller in callers:
        for impl in caller.get_hookimpls():
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                raise ValueError(f"{caller.name}: hook wrappers are not supported (the host calls hooks in order)")
    return sorted(c.name for c in callers)


def inspect_plugin(name: str, plugin: Any, **meta: Any) -> PluginInfo:
    """Build the :class:`PluginInfo` of a loaded plugin object, validating its hooks."""
    info = PluginInfo(name=name, plugin=plugin, module=getattr(plugin, "__name__", type(plugin).__name__), **meta)
    try:
        info.hooks = _validate(name, plugin)
        info.requires = tuple(getattr(plugin, "requires", ()))
        info.conflicts = tuple(getattr(plugin, "conflicts", ()))
        info.conflict_reasons = dict(getattr(plugin, "conflict_reasons", {}))
        info.after = tuple(getattr(plugin, "after", ()))
        info.knobs = tuple(getattr(plugin, "knobs", ()))
    except Exception as e:  # pluggy.PluginValidationError and friends
        info.error = f"invalid plugin: {type(e).__name__}: {str(e).splitlines()[0]}"
    return info


def refuse_excluded(requested, source: str) -> None:
    """A UsageError if a requested plugin is installed but NORMLAB_LOAD_PLUGINS leaves it out (metadata only)."""
    allowed = allowed_names()
    if allowed is None:
        return
    installed = {ep.name for ep in md.entry_points(group=GROUP)}
    left_out = [n for n in requested if n in installed and n not in allowed]
    if left_out:
        raise UsageError(f"{source}: plugins: {left_out[0]!r} is installed, but {ENV_VAR}="
                         f"{os.environ.get(ENV_VAR)!r} leaves it out; add it to {ENV_VAR} or unset the variable")


def discover() -> dict[str, PluginInfo]:
    """Load the plugins installed under the ``normlab`` entry-point group."""
    allowed = allowed_names()
    found: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        meta = {"distribution": dist.metadata["Name"] if dist else None, "version": dist.version if dist else None}
        try:
            plugin = ep.load()
        except Exception as e:
            found[ep.name] = PluginInfo(ep.name, module=ep.value, error=f"failed to import {ep.value}: "
                                        f"{type(e).__name__}: {e}", **meta)
            continue
        found[ep.name] = inspect_plugin(ep.name, plugin, **meta)
    if allowed:
        for missing in sorted(allowed - set(found)):
            log.warning("%s names %r, but no installed plugin has that name", ENV_VAR, missing)
    return found


class Hooks:
    """Calls the enabled plugins' hooks in run-file order; errors name the plugin.

    Implementations are looked up once; a call is a plain loop, so dispatch costs
    microseconds per hook. Chained hooks (see :data:`CHAINED`) pass each result on.
    """

    def __init__(self, plugins: Iterable[tuple[str, Any]]):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.order: list[str] = []
        for name, plugin in plugins:
            self.pm.register(plugin, name=name)
            self.order.append(name)
        self.pm.check_pending()
        rank = {n: i for i, n in enumerate(self.order)}
        self._impls: dict[str, list[tuple[str, Callable, tuple[str, ...]]]] = {}
        self._returns: dict[str, tuple[str, Callable[[Any], bool]]] | None = None
        self.current: str | None = None  # the plugin whose hook is running (for errors that name it)
        for hook_name in HOOKS:
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            impls = sorted(impls, key=lambda i: rank[i.plugin_name])
            self._impls[hook_name] = [(i.plugin_name, i.function, tuple(i.argnames)) for i in impls]

    def implemented(self, hook_name: str) -> list[str]:
        """Names of enabled plugins implementing ``hook_name``, in call order."""
        return [n for n, _, _ in self._impls[hook_name]]

    def _invoke(self, hook_name: str, plugin: str, fn: Callable, argnames, kwargs: dict) -> Any:
        outer, self.current = self.current, plugin  # a hook may run the model, and so other plugins' hooks
        try:
            out = fn(*[kwargs[a] for a in argnames])
        except (RunFailure, UsageError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise PluginError(plugin, hook_name, e) from e
        finally:
            self.current = outer
        if out is not None:
            if self._returns is None:
                self._returns = _expected_returns()
            expected, refused = self._returns.get(hook_name, (None, lambda v, kw: None))
            what = refused(out, kwargs)
            if what is not None:
                raise UsageError(f"plugin {plugin!r} returned {what} from {hook_name}; expected {expected} or None")
        return out

    def call(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a hook; chained hooks return the final value, others the list of non-None results."""
        impls = self._impls[hook_name]
        carried = CHAINED.get(hook_name)
        if carried is not None:
            for plugin, fn, argnames in impls:
                out = self._invoke(hook_name, plugin, fn, argnames, kwargs)
                if out is not None:
                    kwargs[carried] = out
            return kwargs[carried]
        results = []
        for plugin, fn, argnames in impls:
            out = self._invoke(hook_name, plugin, fn, argnames, kwargs)
            if out is not None:
                results.append(out)
        return results


class PluginError(RunFailure):
    """A plugin raised inside a hook; the message names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, error: BaseException):
        self.plugin, self.hook, self.error = plugin, hook, error
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(error).__name__}: {error}")
