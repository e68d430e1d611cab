"""Eval-mode BatchNorm folded into the convolution before it, for inner loops (an attack's forwards).

In eval mode a BN is the per-channel affine map ``y = s * (z - m) + b`` with
``s = w / sqrt(v + eps)``; after ``z = conv(x; W, c)`` the two are one
convolution with weight ``W * s`` and bias ``s * (c - m) + b``: exact up to
float rounding, one pass over the activations fewer forward and backward.
:func:`folded` applies it for a block: each folded convolution's ``forward`` is
shadowed by the folded one and its BN's by the identity (its activation and
drop kept), and both are given back on exit. No parameter, buffer or module of
the model is changed; the folded tensors are computed on entry from the current
weights and statistics, so enter the block again after the weights change.

Only a plain ``nn.Conv2d`` immediately followed (in its parent's registration
order) by an eval-mode BN with running statistics and no hooks is folded: a
``NormAct`` whose norm is a BN or a :class:`RoutedNorm` (the route the active
context selects on entry; per-sample routing is not folded), a plain
``BatchNorm2d`` or timm's ``BatchNormAct2d``. That is timm's conv-BN order in
ResNet, EfficientNet and RegNet (every BN) and DenseNet (the BN after each
layer's first conv; the pre-activation BNs follow a concatenation and stay); :func:`check_folded` compares a
folded forward with the plain one, for callers to run once per model.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .norm import NormAct, RoutedNorm

__all__ = ["folded", "fold_pairs", "check_folded", "folded_if_exact"]


def fold_pairs(modules: Iterable[nn.Module]) -> list[tuple[nn.Conv2d, nn.Module]]:
    """(conv, norm layer) pairs in ``modules`` (a sequence run in order, such as a split's tail stages) and
    their subtrees: a plain Conv2d and the norm right after it (in the sequence, or among its siblings)."""
    modules = list(modules)
    pairs, seen = [], set()
    for siblings in [modules] + [list(p.children()) for root in modules for p in root.modules()]:
        for conv, nxt in zip(siblings, siblings[1:]):
            if type(conv) is nn.Conv2d and isinstance(nxt, (nn.BatchNorm2d, NormAct)) and id(conv) not in seen:
                seen.add(id(conv))
                pairs.append((conv, nxt))
    return pairs


def _identity(x):
    return x


def _target(norm: nn.Module) -> tuple[nn.modules.batchnorm._BatchNorm, nn.Module, Callable] | None:
    """(the BN that would run now, the module whose forward to shadow, its replacement), or None."""
    if isinstance(norm, NormAct):
        inner = norm.norm
        bn = inner.selected() if isinstance(inner, RoutedNorm) else inner
        shadow, replacement = inner, _identity
    elif type(norm) is nn.BatchNorm2d:
        bn, shadow, replacement = norm, norm, _identity
    elif isinstance(norm, nn.BatchNorm2d) and type(norm).__name__ == "BatchNormAct2d":  # timm's: bn, drop, act
        bn, shadow = norm, norm

        def replacement(x, m=norm):
            return m.act(m.drop(x))
    else:
        return None
    if (type(bn) is not nn.BatchNorm2d or bn.training or not bn.track_running_stats or bn.running_mean is None
            or bn._forward_hooks or bn._forward_pre_hooks or shadow._forward_hooks or shadow._forward_pre_hooks):
        return None
    return bn, shadow, replacement


@contextlib.contextmanager
def folded(modules: Iterable[nn.Module]) -> Iterator[int]:
    """Fold every eval-mode BN of ``modules`` into its convolution for the block; yields how many were folded."""
    patches: list[tuple[nn.Module, Callable]] = []
    with torch.no_grad():
        for conv, norm in fold_pairs(modules):
            found = _target(norm)
            if found is None or conv._forward_hooks or conv._forward_pre_hooks:
                continue
            bn, shadow, replacement = found
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
            bias = shift if conv.bias is None else shift + conv.bias * scale

            def forward(x, conv=conv, weight=weight, bias=bias.to(conv.weight.dtype)):
                return conv._conv_forward(x, weight, bias)

            patches += [(conv, forward), (shadow, replacement)]
    for module, fn in patches:
        module.forward = fn
    try:
        yield len(patches) // 2
    finally:
        for module, _ in patches:
            module.__dict__.pop("forward", None)


def check_folded(run: Callable[[], torch.Tensor], modules: Iterable[nn.Module], rtol: float = 1e-4) -> bool:
    """Whether ``run()`` (a forward through ``modules``) gives the same output folded as plain (True, without
    running it, when nothing would be folded)."""
    modules = list(modules)
    with folded(modules) as n:
        pass
    if not n:
        return True
    with torch.no_grad():
        plain = run()
        with folded(modules):
            fold = run()
    return bool(torch.allclose(fold, plain, rtol=rtol, atol=rtol * float(plain.abs().max().clamp_min(1e-12))))


def folded_if_exact(state: dict, modules: Iterable[nn.Module], probe: Callable[[], torch.Tensor],
                    warn: Callable[[str], None] | None = None):
    """:func:`folded` for ``modules``, once :func:`check_folded` has found on ``probe()`` (a small forward
    through them) that folding does not change it; the verdict is kept in ``state["fold_checked"]`` (a
    plugin's per-run state), and a failed check means a plain block from then on."""
    modules = list(modules)
    if state.get("fold_checked") is None:
        state["fold_checked"] = check_folded(probe, modules)
        if not state["fold_checked"] and warn is not None:
            warn("folding the BNs into their convolutions changed the output; running them unfolded")
    return folded(modules) if state["fold_checked"] else contextlib.nullcontext()
