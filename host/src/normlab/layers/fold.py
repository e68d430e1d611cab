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
``NormAct`` (then FiLM, drop and activation still run) whose norm is a BN or a
:class:`RoutedNorm` (the route the active context selects on entry; per-sample
routing is not folded), a plain ``BatchNorm2d`` or timm's ``BatchNormAct2d``.
That is timm's conv-BN order in ResNet, EfficientNet and RegNet (every BN) and
DenseNet (the BN after each layer's first conv; the pre-activation BNs follow a
concatenation and stay); :func:`check_folded` compares a folded forward with the
plain one, for callers to run once per model.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .norm import NormAct, bn_affine, eval_bn

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


class _Relayout(torch.autograd.Function):
    """``x`` in memory format ``layout``; its gradient goes back in ``x``'s own layout (torchattacks
    ``view``s input gradients, which a channels-last gradient of a contiguous input would not allow)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.back = torch.contiguous_format if x.is_contiguous() else torch.preserve_format
        return x.contiguous(memory_format=layout)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.back) if ctx.back is torch.contiguous_format else grad, None


def relayout(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``x`` (4-d) in memory format ``layout`` (itself when it already is), its gradient in ``x``'s own layout."""
    if x.dim() != 4 or x.is_contiguous(memory_format=layout):
        return x
    return _Relayout.apply(x, layout)


def _target(norm: nn.Module) -> tuple[nn.modules.batchnorm._BatchNorm, nn.Module, Callable] | None:
    """(the BN that would run now, the module whose forward to shadow, its replacement), or None."""
    if isinstance(norm, NormAct):  # subclasses too (the condition plugin's fuses BN and FiLM): norm skipped
        bn, shadow = eval_bn(norm.norm), norm

        def replacement(x, m=norm):
            return m.act(m.drop(x if m.film is None else m.film(x)))
    elif type(norm) is nn.BatchNorm2d:
        bn, shadow, replacement = eval_bn(norm), norm, _identity
    elif isinstance(norm, nn.BatchNorm2d) and type(norm).__name__ == "BatchNormAct2d":  # timm's: bn, drop, act
        bn, shadow = norm, norm
        if norm.training or not norm.track_running_stats or norm.running_mean is None:
            bn = None

        def replacement(x, m=norm):
            return m.act(m.drop(x))
    else:
        return None
    if (bn is None or bn._forward_hooks or bn._forward_pre_hooks or shadow._forward_hooks
            or shadow._forward_pre_hooks):
        return None
    return bn, shadow, replacement


@contextlib.contextmanager
def folded(modules: Iterable[nn.Module], channels_last: bool = False) -> Iterator[int]:
    """Fold every eval-mode BN of ``modules`` into its convolution for the block; yields how many were folded.

    ``channels_last`` stores the folded weights, and a copy of every other convolution's, in that memory
    format (a layout: the same numbers) and hands each convolution its input in it (a no-op after the
    first). Whether that is faster depends on the processor: on resnet18's tail at 8x8, batch 128, one
    CPU thread, 0.57x the time of contiguous weights and inputs on one Xeon and 1.17x on another (with
    AMX); the plugins pass the run's ``train.channels_last`` (by default on CUDA and on CPUs without AMX:
    :func:`normlab.runner.channels_last`). The caller's tensors
    keep their layout, so an attack's random start (drawn in memory order) is the same either way.
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    modules = list(modules)
    patches: list[tuple[nn.Module, Callable]] = []
    n = 0
    with torch.no_grad():
        for conv, norm in fold_pairs(modules):
            found = _target(norm)
            if found is None or conv._forward_hooks or conv._forward_pre_hooks:
                continue
            n += 1
            bn, shadow, replacement = found
            scale, shift = bn_affine(bn)
            weight = (conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)).contiguous(memory_format=layout)
            bias = shift if conv.bias is None else shift + conv.bias * scale

            def forward(x, conv=conv, weight=weight, bias=bias.to(conv.weight.dtype)):
                return conv._conv_forward(relayout(x, layout), weight, bias)

            patches += [(conv, forward), (shadow, replacement)]
        if channels_last:  # the other convolutions too, in the same layout
            done = {id(m) for m, _ in patches}
            for conv in {id(c): c for root in modules for c in root.modules() if type(c) is nn.Conv2d}.values():
                if id(conv) not in done and not conv._forward_pre_hooks:
                    def forward(x, conv=conv, weight=conv.weight.contiguous(memory_format=layout)):
                        return conv._conv_forward(relayout(x, layout), weight, conv.bias)

                    patches.append((conv, forward))
    for module, fn in patches:
        module.forward = fn
    try:
        yield n
    finally:
        for module, _ in patches:
            module.__dict__.pop("forward", None)


def check_folded(run: Callable[[], torch.Tensor], modules: Iterable[nn.Module], rtol: float = 1e-4) -> bool:
    """Whether ``run()`` (a forward through ``modules``) gives the same output folded as plain (True, without
    running it, when nothing would be folded)."""
    with torch.no_grad():
        with folded(modules) as n:
            if not n:
                return True
            fold = run()
        plain = run()
    return bool(torch.allclose(fold, plain, rtol=rtol, atol=rtol * float(plain.abs().max().clamp_min(1e-12))))


def folded_if_exact(state: dict, modules: Iterable[nn.Module], probe: Callable[[], torch.Tensor],
                    warn: Callable[[str], None] | None = None, channels_last: bool = False):
    """:func:`folded` for ``modules``, once :func:`check_folded` has found on ``probe()`` (a small forward
    through them) that folding does not change it; the verdict is kept in ``state["fold_checked"]`` (a
    plugin's per-run state), and a failed check means a plain block from then on."""
    modules = list(modules)
    if state.get("fold_checked") is None:
        state["fold_checked"] = check_folded(probe, modules)
        if not state["fold_checked"] and warn is not None:
            warn("folding the BNs into their convolutions changed the output; running them unfolded")
    return folded(modules, channels_last) if state["fold_checked"] else contextlib.nullcontext()
