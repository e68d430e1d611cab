"""Norm-layer building blocks: finding, replacing, wrapping and routing BN layers."""

from __future__ import annotations

import copy
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..context import Routing, current

__all__ = ["NormAct", "RoutedNorm", "as_norm_act", "copy_bn", "iter_norms", "replace_module", "batch_norms", "eval_bn",
           "bn_affine"]


class NormAct(nn.Module):
    """norm -> film -> drop -> act, the shape of timm's ``BatchNormAct2d`` made composable.

    ``norm`` may be any module (a BN, a :class:`RoutedNorm`); ``film`` is None or
    a :class:`~normlab.layers.FiLM`. ``drop`` and ``act`` are the ones the
    original layer fused in, kept so that wrapping never loses them.
    """

    def __init__(self, norm: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None,
                 film: nn.Module | None = None):
        super().__init__()
        self.norm = norm
        self.film = film
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.film is not None:
            x = self.film(x)
        return self.act(self.drop(x))


def copy_bn(bn: nn.modules.batchnorm._BatchNorm, cls: type = nn.BatchNorm2d,
            channels: int | None = None) -> nn.modules.batchnorm._BatchNorm:
    """A new ``cls`` BN (a plain ``nn.BatchNorm2d`` by default) with ``bn``'s settings, device and dtype, its
    parameters, statistics and frozen flags, and its mode; with ``channels``, those of its first channels
    only (a slimmable width). A fused activation or drop of ``bn`` (timm's ``BatchNormAct2d``) is not copied."""
    c = bn.num_features if channels is None else channels
    out = cls(c, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)
    ref = bn.weight if bn.affine else bn.running_mean
    if ref is not None:
        out.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                getattr(out, name).copy_(src[:c])
        if bn.num_batches_tracked is not None:
            out.num_batches_tracked.copy_(bn.num_batches_tracked)
    for name, p in out.named_parameters(recurse=False):
        p.requires_grad_(getattr(bn, name).requires_grad)
    return out.train(bn.training)


def as_norm_act(module: nn.Module) -> NormAct:
    """View any BN layer as a :class:`NormAct`, keeping a fused activation and drop.

    ``NormAct`` is returned as is; timm's ``BatchNormAct2d`` becomes a plain BN
    followed by its own ``drop`` and ``act`` modules (the same objects); a plain
    ``BatchNorm2d`` becomes ``NormAct(bn)``.
    """
    if isinstance(module, NormAct):
        return module
    if isinstance(module, nn.BatchNorm2d):
        drop = getattr(module, "drop", None)
        act = getattr(module, "act", None)
        if drop is None and act is None:
            return NormAct(module).train(module.training)
        return NormAct(copy_bn(module), drop=drop, act=act).train(module.training)
    raise TypeError(f"as_norm_act: expected a BatchNorm2d or NormAct, got {type(module).__name__}")


class RoutedNorm(nn.Module):
    """Several independent norm layers; the active context chooses which one runs.

    ``key`` names the :class:`~normlab.context.Context` field that selects the
    route (``route`` for clean/adversarial BN, ``width`` for switchable BN).
    The field may be None (first route), a route name, or a per-sample
    :class:`~normlab.context.Routing`, in which case each route normalizes its
    own samples: contiguous groups are split as views, otherwise the batch is
    permuted once and back.
    """

    def __init__(self, routes: Sequence[nn.Module], names: Sequence[str], key: str = "route"):
        super().__init__()
        if len(routes) != len(names) or not routes:
            raise ValueError("RoutedNorm needs one name per route and at least one route")
        self.routes = nn.ModuleList(routes)
        self.names = tuple(str(n) for n in names)
        self.key = key

    @classmethod
    def copies(cls, norm: nn.Module, names: Sequence[str], key: str = "route") -> "RoutedNorm":
        """Routes that all start as exact copies of ``norm`` (its statistics included)."""
        return cls([norm] + [copy.deepcopy(norm) for _ in names[1:]], names, key)

    def index(self, name) -> int:
        try:
            return self.names.index(str(name))
        except ValueError:
            raise KeyError(f"RoutedNorm keyed on {self.key!r} has routes {self.names}, not {name!r}") from None

    def selected(self) -> nn.Module | None:
        """The route the active context selects for the whole batch; None when it routes per sample."""
        sel = getattr(current(), self.key)
        if isinstance(sel, Routing):
            return None
        return self.routes[0] if sel is None else self.routes[self.index(sel)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.selected()
        if route is not None:
            return route(x)
        sel = getattr(current(), self.key)
        if sel.perm is not None:
            return self._per_sample(x[sel.perm], sel)[sel.inverse]
        return self._per_sample(x, sel)

    @property
    def collective(self) -> bool:
        """Whether a route holds a synchronised BN (normlab.distributed), nested routes included."""
        return any(getattr(r, "collective", False) for r in self.routes)

    def _per_sample(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        outs = []
        for name, chunk in zip(routing.names, x.split(routing.counts)):
            route = self.routes[self.index(name)]
            # a route with no rows is skipped, except a synchronised BN in training (normlab.distributed):
            # every process must join its all-reduces, whether or not it has rows for that route
            if chunk.shape[0] or (route.training and getattr(route, "collective", False)):
                outs.append(route(chunk))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def extra_repr(self) -> str:
        return f"key={self.key!r}, names={self.names}"


def eval_bn(norm: nn.Module) -> nn.BatchNorm2d | None:
    """The plain BN that ``norm`` (a BN, or nested :class:`RoutedNorm` under the active context) runs now, if it
    normalises with its running statistics (eval mode) and may be replaced by its affine map (fused, folded);
    else None (train mode, per-sample routes, another kind of layer, or a BN that must run as itself: one
    with forward hooks or an instance-level forward, as bnrect's estimate and its per-forward adaptation
    install, since a fused or folded BN never calls them)."""
    bn = norm
    while isinstance(bn, RoutedNorm):  # routes may nest (OATS: route, then width)
        bn = bn.selected()
    if type(bn) is not nn.BatchNorm2d or bn.training or not bn.track_running_stats or bn.running_mean is None:
        return None
    if bn._forward_pre_hooks or bn._forward_hooks or "forward" in bn.__dict__:
        return None
    return bn


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN as the per-channel affine map ``x * scale + shift``: ``scale = w / sqrt(v + eps)``,
    ``shift = b - m * scale`` (``w = 1``, ``b = 0`` without affine parameters)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale, shift


NORM_TYPES = (nn.BatchNorm2d, NormAct)


def iter_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) for each norm layer a plugin may visit, outermost only.

    Norm layers are ``nn.BatchNorm2d`` (timm's ``BatchNormAct2d`` included) and
    :class:`NormAct` wrappers; what a wrapper contains is not visited again.
    """

    def walk(prefix: str, module: nn.Module):
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, NORM_TYPES):
                yield name, child
            else:
                yield from walk(name, child)

    yield from walk("", model)


def batch_norms(model: nn.Module) -> Iterator[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BN layer with statistics, inside wrappers and routes too."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield name, m


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def map_norms(model: nn.Module, fn: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Replace each norm layer by ``fn(name, module)`` where it returns a module; count replacements."""
    n = 0
    for name, module in list(iter_norms(model)):
        new = fn(name, module)
        if new is not None and new is not module:
            replace_module(model, name, new)
            n += 1
    return n
