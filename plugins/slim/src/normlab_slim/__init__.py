"""Slimmable widths with switchable BN (Yu et al., ICLR 2019); with condition and pgd, OATS (Wang et al. 2020).

One set of weights serves several widths. At width ``w`` every convolution runs
its first ``round(w * C_out)`` filters (:class:`SlimConv2d`; its input channels
follow the input tensor, so the stem keeps its 3), the classifier reads the
first features it is given (:class:`SlimLinear`), and each width has its own BN
layers (switchable BN: a :class:`~normlab.layers.RoutedNorm` keyed on
``ctx.width``, its BN at width ``w`` initialised from the first channels of the
original). Widths run largest first, and an unset ``ctx.width`` means the
largest, for convolutions and norms alike.

Training (``on_batch``): with more than one width the step runs one pass per
width (``ctx.passes``): the host forwards, calls every plugin's ``on_loss``
(pgd's adversarial term at that width included) and back-propagates once per
width, then takes one optimizer step, so the shared weights get the sum of the
per-width gradients (Yu et al.'s Algorithm 1) and memory holds one width's graph.
With condition and pgd this is OATS (OAT paper, section 3.3): lambda is sampled
once per step in condition's ``on_batch`` and every width uses the same samples.

Test time (``on_domain``, knob ``width``): the run file's ``width`` (null: the
largest), or a sweep's value; ``on_eval`` adds the FLOPs of one forward of one
image at each width (``slim/width=W/flops``, counted with torch's FlopCounterMode).

Channel counts: ``round(w * C)`` (at least 1), as the issue and the slimmable
networks paper state; the OAT code takes ``int(w * C)``, the same for every
timm ResNet width at w = 0.25, 0.5, 0.75 (multiples of 4 channels).

Supported: timm's ``ResNet`` class (basic and bottleneck blocks, projection
shortcuts, deep and CIFAR stems, SE/ECA attention); grouped convolutions
(ResNeXt) and anti-aliased downsampling are refused with exit status 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from normlab import hookimpl
from normlab.context import Context, current
from normlab.errors import UsageError
from normlab.layers import RoutedNorm, as_norm_act, copy_bn, replace_module
from torch import nn

from .settings import Config

requires = ()
conflicts = ("nf", "advbn")
conflict_reasons = {
    "nf": "nf removes every BN layer, so there is no BN to make switchable",
    "advbn": "advbn keeps one front feature per step and attacks it once, while slim's passes run the network "
             "at several widths per step",
}
after = ()
knobs = ("width",)

NAME = "slim"


def channels(c: int, width: float) -> int:
    """The channels a layer of ``c`` channels keeps at ``width``: ``round(width * c)``, at least 1."""
    return max(1, int(round(width * c)))


def _width(default: float) -> float:
    w = current().width
    return default if w is None else float(w)


class SlimConv2d(nn.Conv2d):
    """A convolution that runs its first ``round(w * out_channels)`` filters at the context's width ``w``.

    Input channels follow the input (its first ``x.shape[1]``). It holds the original's parameter
    objects, so its state-dict keys and values are those of the convolution it replaces; at full width
    on a full input it is that convolution (the same call, bit for bit).
    """

    @classmethod
    def of(cls, conv: nn.Conv2d, default: float) -> "SlimConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.default = default
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channels(self.out_channels, _width(self.default))
        if out == self.out_channels and x.shape[1] == self.in_channels:
            return super().forward(x)
        bias = None if self.bias is None else self.bias[:out]
        return self._conv_forward(x, self.weight[:out, : x.shape[1]], bias)


class SlimLinear(nn.Linear):
    """A classifier that reads the first ``x.shape[-1]`` input features (all outputs kept)."""

    @classmethod
    def of(cls, fc: nn.Linear) -> "SlimLinear":
        new = cls(fc.in_features, fc.out_features, bias=fc.bias is not None, device="meta")
        new.weight = fc.weight
        new.bias = fc.bias
        return new.train(fc.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.in_features:
            return super().forward(x)
        return F.linear(x, self.weight[:, : x.shape[-1]], self.bias)


def switchable(module: nn.Module, widths: list[float]) -> nn.Module:
    """``module`` with every BN leaf replaced by a switchable BN over ``widths`` (largest first), in place
    where the leaf sits inside another module (a route of the condition plugin's dual BN)."""
    if isinstance(module, RoutedNorm) and module.key == "width":
        return module
    if isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        return RoutedNorm([copy_bn(module, channels=channels(c, w)) for w in widths], [str(w) for w in widths],
                          key="width")
    for name, child in list(module.named_children()):
        new = switchable(child, widths)
        if new is not child:
            setattr(module, name, new)
    return module


def _supported(model: nn.Module, run) -> None:
    from timm.models.resnet import ResNet

    where = f"{run.source}: model.name"
    if not isinstance(model, ResNet):
        raise UsageError(f"{where}: plugin 'slim' supports timm's ResNet family (resnet*, resnet*d, wide_resnet*, "
                         f"seresnet*, ecaresnet*: basic and bottleneck blocks); {run.config.model.name} is a "
                         f"{type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise UsageError(f"{where}: plugin 'slim' expected ungrouped convolutions; {run.config.model.name}'s "
                             f"{name} has groups={m.groups} (ResNeXt is not supported)")
        if "BlurPool" in type(m).__name__:
            raise UsageError(f"{where}: plugin 'slim' does not support anti-aliased downsampling "
                             f"({run.config.model.name}'s {name} is a {type(m).__name__})")


def _check_sweeps(run, cfg: Config) -> None:
    """A sweep over ``width`` names only trained widths (refused at build time, not after training)."""
    sweep = getattr(run, "evaluators", {}).get("sweep")
    if sweep is None or sweep.plugin is not None or "width" not in sweep.axes:
        return
    bad = [w for w in sweep.axes["width"] if float(w) not in cfg.widths]
    if bad:
        key = "grid.width" if sweep.grid is not None else "values"
        raise UsageError(f"{run.source}: evaluate.sweep.{key}: expected widths among plugins.slim.widths "
                         f"{cfg.widths}, got {bad[0]}")


@hookimpl
def on_model(model, run):
    cfg: Config = run.plugin_config(NAME)
    _supported(model, run)
    _check_sweeps(run, cfg)
    default = cfg.widths[0]
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d:
            replace_module(model, name, SlimConv2d.of(m, default))
    fc = model.get_classifier()
    if type(fc) is nn.Linear:
        replace_module(model, "fc", SlimLinear.of(fc))
    return None


@hookimpl
def on_batch_norm(name, module, model, run):
    cfg: Config = run.plugin_config(NAME)
    layer = as_norm_act(module)
    layer.norm = switchable(layer.norm, cfg.widths)
    return layer


@hookimpl
def on_batch(batch, ctx: Context):
    cfg: Config = ctx.run.plugin_config(NAME)
    if len(cfg.widths) > 1:
        ctx.passes = [{"width": w} for w in cfg.widths]
    return None


@hookimpl
def on_domain(model, domain, samples, ctx: Context):
    """Apply the ``width`` knob: a sweep's value if ``ctx.width`` holds one, else the configured one."""
    cfg: Config = ctx.run.plugin_config(NAME)
    width = cfg.default_width if ctx.width is None else float(ctx.width)
    if width not in cfg.widths:
        raise UsageError(f"{ctx.run.source}: evaluate.sweep: width {width} is not one of plugins.slim.widths "
                         f"{cfg.widths}")
    saved = ctx.width
    ctx.width = width

    def restore():
        ctx.width = saved

    return restore


def flops(model: nn.Module, x: torch.Tensor, ctx: Context, width: float) -> int:
    """FLOPs of one forward of ``x`` at ``width`` (torch's FlopCounterMode: convolutions and matmuls).

    Counted outside any domain: with the condition plugin no lambda is set, so no FiLM MLP runs. That is
    also the per-image cost as evaluated, where the fused BN + FiLM coefficients are computed once per
    lambda and reused by every forward (condition's ``CondNormAct``), not per image.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), ctx.using(width=width), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


@hookimpl
def on_eval(model, ctx, report):
    cfg: Config = ctx.run.plugin_config(NAME)
    x0 = ctx.run.data.test[0][0]
    x = torch.zeros((1, *x0.shape), device=next(model.parameters()).device)
    for w in cfg.widths:
        report.add(f"slim/width={w}/flops", float(flops(model, x, ctx, w)))
