"""Convolutions that skip the kernel taps which only ever meet zero padding (exact).

On a small feature map the outer taps of a padded convolution never touch the
input: a 3x3 convolution with padding 1 on a 1x1 map uses only its centre
weight; a stride-2 one on a 2x2 map only its lower-right 2x2. Such maps are
what timm's ImageNet stems leave at 16-32 px (resnet18's layer4 is 1x1 at
32x32). Every product with a padding zero is zero, so convolving with the
slice of the kernel that meets the input (and the padding shrunk to match)
gives the same sums without their zero terms, and the kernel's gradient is
zero on the skipped taps either way. oneDNN does not skip them, and its kernel
gradient at 1x1 maps is slow: on an AVX2 CPU, one thread, batch 128, a
512-channel 3x3 convolution on 1x1 maps takes 5 ms forward and 143 ms for the
kernel gradient, against 1.5 ms for the 1x1 convolution that is its centre tap
(measurements: benchmarks/README.md, "Padding taps").

:func:`skip_padding_taps` gives every ``nn.Conv2d`` of a model (subclasses
that convolve through ``_conv_forward`` included, such as slim's; timm's
weight-standardised ``StdConv2d`` and ``ScaledStdConv2d`` of the NF nets call
``F.conv2d`` themselves, so their forward is routed through it) a
``_conv_forward`` of its own that crops the kernel to its live taps for the
input's size; nothing else changes: parameters, state dicts, module types and
the outputs' shapes are those of the plain model. Cropping happens only where
the cropped convolution gives the same output size; otherwise the plain one runs.

Where what is left has one output position and no padding (the cropped 3x3
convolutions on 1x1 maps, a stride-2 one on a 2x2 map, a 1x1 downsample of a
2x2 map), the convolution is one matrix product of the pixels it meets with the
flattened kernel, and runs as ``F.linear`` (the same sums; on the AVX2 CPU above
the matrix product is 3-6x faster there than oneDNN's convolution, forward and
backward).
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["live_taps", "skip_padding_taps", "padding_taps_kept"]


@functools.lru_cache(maxsize=4096)
def live_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """The taps ``[first, last)`` of one kernel dimension that meet the input (not the padding) at some
    output position; ``(0, kernel)`` when every tap does or the convolution has no output."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    live = [i for i in range(kernel) if any(0 <= o * stride + i * dilation - padding < size for o in range(out))]
    return (live[0], live[-1] + 1) if live else (0, kernel)


def _cropped(first: int, last: int, kernel: int, stride: int, padding: int, dilation: int,
             size: int) -> int | None:
    """The padding that makes taps ``[first, last)`` alone give the plain output size, or None."""
    if (first, last) == (0, kernel):
        return None
    pad = padding - first * dilation
    if pad < 0:  # a padding that is not a multiple of the dilation: the live taps start inside the input
        return None
    same = (size + 2 * pad - dilation * (last - first - 1) - 1) // stride == \
           (size + 2 * padding - dilation * (kernel - 1) - 1) // stride
    return pad if same else None


class _LiveKernel(torch.autograd.Function):
    """``weight[:, :, h0:h1, w0:w1]`` whose gradient is written once into zeros laid out as ``weight``.

    Plain slicing is two autograd nodes (one per dimension), each filling a zero tensor and copying into
    it, and the last of them is contiguous, so a channels-last weight's gradient is transposed once more
    when it is accumulated: at 32x32 that was 46 ms of a resnet18 step on the AVX2 CPU above."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, h0: int, h1: int, w0: int, w1: int) -> torch.Tensor:
        ctx.box, ctx.shape = (h0, h1, w0, w1), weight.shape
        ctx.layout = torch.channels_last if _channels_last(weight) else torch.contiguous_format
        return weight[:, :, h0:h1, w0:w1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h0, h1, w0, w1 = ctx.box
        full = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout).zero_()
        full[:, :, h0:h1, w0:w1] = grad
        return full, None, None, None, None


def _channels_last(weight: torch.Tensor) -> bool:
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _conv_forward(self: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    plain = type(self)._conv_forward
    if self.padding_mode != "zeros" or isinstance(self.padding, str):
        return plain(self, x, weight, bias)
    crop = []
    for dim in (0, 1):
        k, s, p, d = self.kernel_size[dim], self.stride[dim], self.padding[dim], self.dilation[dim]
        first, last = live_taps(x.shape[dim - 2], k, s, p, d)
        crop.append((first, last, _cropped(first, last, k, s, p, d, x.shape[dim - 2])))
    (h0, h1, ph), (w0, w1, pw) = crop
    cropped = ph is not None or pw is not None
    if ph is None:
        h0, h1, ph = 0, self.kernel_size[0], self.padding[0]
    if pw is None:
        w0, w1, pw = 0, self.kernel_size[1], self.padding[1]
    reach_h, reach_w = self.dilation[0] * (h1 - h0 - 1) + 1, self.dilation[1] * (w1 - w0 - 1) + 1
    if self.groups == 1 and x.dim() == 4 and ph == pw == 0 and 0 <= x.shape[-2] - reach_h < self.stride[0] \
            and 0 <= x.shape[-1] - reach_w < self.stride[1]:
        # one output position and no padding left: the convolution is one matrix product of the pixels it meets
        seen = x[:, :, :reach_h:self.dilation[0], :reach_w:self.dilation[1]]
        whole = (h0, h1, w0, w1) == (0, weight.shape[2], 0, weight.shape[3])
        w = weight if whole else _LiveKernel.apply(weight, h0, h1, w0, w1)
        if _channels_last(weight):
            seen, w = seen.permute(0, 2, 3, 1), w.permute(0, 2, 3, 1)  # flatten (H, W, C): whole rows of C, no gather
        return F.linear(seen.flatten(1), w.flatten(1), bias).view(x.shape[0], w.shape[0], 1, 1)
    if not cropped:
        return plain(self, x, weight, bias)
    return F.conv2d(x, _LiveKernel.apply(weight, h0, h1, w0, w1), bias, self.stride, (ph, pw), self.dilation,
                    self.groups)


def _standardized_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """timm's ``StdConv2d`` / ``ScaledStdConv2d`` forward (weight standardisation over each filter, then the gain
    and fan-in scale for the scaled one), with the convolution through ``_conv_forward`` so that it skips the
    padding taps too (timm calls ``F.conv2d``). Standardising uses the whole kernel, so the numbers are the same;
    tests/test_taps.py checks them against timm's own forward."""
    gain = (self.gain * self.scale).view(-1) if hasattr(self, "gain") else None
    weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=gain, training=True,
                          momentum=0.0, eps=self.eps).reshape_as(self.weight)
    return self._conv_forward(x, weight, self.bias)


def _standardized() -> tuple[type, ...]:
    from timm.layers import ScaledStdConv2d, StdConv2d

    return StdConv2d, ScaledStdConv2d


def skip_padding_taps(model: nn.Module) -> int:
    """Make every ``nn.Conv2d`` of ``model`` skip the taps that meet only padding; returns how many."""
    n, standardized = 0, _standardized()
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and "_conv_forward" not in m.__dict__:
            m._conv_forward = types.MethodType(_conv_forward, m)
            if type(m) in standardized:  # exactly these: timm's "same"-padding subclasses pad first
                m.forward = types.MethodType(_standardized_forward, m)
            n += 1
    return n


@contextlib.contextmanager
def padding_taps_kept(model: nn.Module) -> Iterator[None]:
    """Every convolution of ``model`` as plain ``nn.Conv2d`` computes it (all taps) for the block."""
    saved = {m: m.__dict__.pop("_conv_forward") for m in model.modules() if "_conv_forward" in m.__dict__}
    try:
        yield
    finally:
        for m, fn in saved.items():
            m._conv_forward = fn
