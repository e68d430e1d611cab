"""Normalizer-free backbones for NoFrost (Wang, Zhang, Zheng, Shi, Li, Wang; ICML 2022).

``on_model`` replaces the run's backbone by a normalizer-free one (Brock et al.,
"Characterizing signal propagation...", 2021), the same way for every model:

- ``build``: backbones with a timm NF counterpart become that model
  (``resnet26/50/101`` -> ``nf_resnet*``, ``seresnet50/101`` -> ``nf_seresnet*``,
  ``ecaresnet26t/50d/101d`` -> ``nf_ecaresnet26/50/101``, ``regnetx_*``/``regnety_*``
  -> ``nf_regnet_b0`` unless ``target`` names another), built with
  ``timm.create_model(target, pretrained=False, num_classes=<the run's>)``.
- ``convert``: any other backbone of timm's ResNet class (resnet18/34, resnet50d,
  resnext, seresnet18, ...) is converted in place. Every norm layer goes; every
  convolution of the stem, the blocks and the shortcuts becomes a
  ``timm.layers.ScaledStdConv2d`` (scaled weight standardisation with a learnable
  gain and a bias); each residual block becomes the pre-activation NF block
  ``h + alpha * f(act(h) / beta)``, where ``beta`` is the expected std of ``h``
  tracked through depth (the expected variance grows by ``alpha**2`` per block and
  resets to 1 at a transition block, whose shortcut convolution sees the
  normalised ``act(h) / beta``, average-pooled instead of strided as in timm's
  NF-ResNets); convolutions are re-initialised as timm's NF nets (N(0, 1/fan_in),
  classifier N(0, 0.01)); the last gain of each branch starts at 0, so every
  block is its skip path at initialisation; activations are multiplied by the
  gamma that gives them unit variance on N(0, 1) inputs (NF-ResNets' ``gamma``,
  computed here by quadrature); a final gamma-scaled activation closes the last
  stage (``layer4.act``).

Pooling breaks the analytic variance rule: the stem's max-pool and the transitions' 2x2 average pools change
the variance by amounts that depend on the spatial correlation of their input (an average pool divides white
noise by 4, a smooth image by about 1). Unchecked, the variance of resnet18's blocks falls 0.83 -> 0.49 ->
0.16 -> 0.06 from stage to stage on MNIST at 32x32 (timm's nf_resnet26: 3.9 -> 1.5 -> 0.53 -> 0.20). With
``calibrate: N`` (off by default), N training images set, in depth order, the gain of the stem's last conv and of
each shortcut conv so that the stem's and every shortcut's output has unit average channel variance on
them: the expected variance that ``beta`` assumes, data-dependent only at the pooling points (as LSUV, Mishkin
and Matas 2016, does at every layer). It is in no reference and lowered accuracy in every setting measured
(examples/nofrost.yaml), so the default ``calibrate: 0`` keeps timm's analytic initialisation alone.

Whether the residual branches ever turn on: NF blocks start as their skip paths (the last gain is 0) and
learn slowly. After every epoch (``on_epoch``) the plugin writes, per residual block, the RMS of the
branch's contribution over the RMS of the skip path on 64 fixed training images
(``nf/branch_ratio/<block>`` and their mean ``nf/branch_ratio/mean`` in ``metrics.csv``).

Backbones that are already normalizer-free (timm's ``nf_*`` and ``nfnet`` models)
are kept. Anything else is a UsageError (exit 2).

Optionally ``agc`` turns on adaptive gradient clipping (Brock et al., 2021) with
that clip factor, as per-parameter gradient hooks (the classifier is not
clipped, as in the NFNet paper); it uses timm's ``unitwise_norm``.
"""

from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict

import torch
from normlab import hookimpl
from normlab.errors import UsageError
from normlab.model import Normalize, small_input_stem
from torch import nn

from .settings import Config

requires = ()
conflicts = ("bnrect", "condition", "advbn", "slim")
conflict_reasons = {
    "bnrect": "nf removes every BN layer, so there are no statistics to rectify",
    "condition": "nf removes every BN layer, so there is no BN to duplicate into clean/adversarial pairs",
    "advbn": "nf removes every BN layer, so there is no auxiliary BN for AdvBN's adversarial route",
    "slim": "slimmable networks need plain convolutions and switchable BN; nf replaces both",
}
after = ()
knobs = ()

#: timm names built as their NF counterpart (exact names; regnets by prefix)
COUNTERPARTS = {
    "resnet26": "nf_resnet26", "resnet50": "nf_resnet50", "resnet101": "nf_resnet101",
    "seresnet50": "nf_seresnet50", "seresnet101": "nf_seresnet101",
    "ecaresnet26t": "nf_ecaresnet26", "ecaresnet50d": "nf_ecaresnet50", "ecaresnet101d": "nf_ecaresnet101",
}
REGNET = re.compile(r"regnet[xy]_\d+")
REGNET_TARGET = "nf_regnet_b0"
SUPPORTED = ("timm ResNets (resnet18/34, resnet*d, resnext*, seresnet18/34, ...: converted in place); "
             "resnet26/50/101, seresnet50/101, ecaresnet26t/50d/101d, regnetx_*/regnety_* "
             "(built as timm's nf_resnet*, nf_seresnet*, nf_ecaresnet*, nf_regnet_b*); "
             "timm NF nets (nf_*, nfnet*: kept)")
ATTN_GAIN = 2.0  # timm NF nets' gain on squeeze-excitation outputs (a sigmoid gate halves the signal)
STD_CONV_EPS = 1e-5  # timm NF-ResNets' std_conv_eps


def activation_gamma(act: nn.Module) -> float:
    """``1 / std(act(z))`` for z ~ N(0, 1), by quadrature on a fine grid (float64).

    The activation's output then has unit variance on unit-Gaussian inputs; for
    ReLU this is ``sqrt(2 / (1 - 1/pi))`` = 1.7139..., NF-ResNets' constant.
    """
    z = torch.linspace(-12.0, 12.0, 480_001, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    with torch.no_grad():
        g = _fresh(act)(z.clone())
    mean = (w * g).sum()
    var = (w * g * g).sum() - mean * mean
    return float(var.rsqrt())


def _fresh(act: nn.Module) -> nn.Module:
    """A copy of ``act`` that never works in place (block inputs are also the skip path)."""
    act = copy.deepcopy(act)
    if hasattr(act, "inplace"):
        act.inplace = False
    return act


class GammaAct(nn.Module):
    """``gamma * act(x)``: an activation scaled to unit variance on N(0, 1) inputs."""

    def __init__(self, act: nn.Module, gamma: float | None = None):
        super().__init__()
        self.act = _fresh(act)
        self.gamma = activation_gamma(self.act) if gamma is None else float(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.gamma

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:.6f}"


# --- scaled weight-standardised convolutions ------------------------------------

def std_conv(conv: nn.Conv2d, gain_init: float = 1.0) -> nn.Module:
    """``conv`` as a timm ``ScaledStdConv2d`` with the same geometry and weights, a zero bias and a gain.

    (:func:`convert_resnet` then re-initialises the weights as timm's NF nets do.)"""
    from timm.layers import ScaledStdConv2d

    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        raise TypeError(f"expected a plain nn.Conv2d, got {type(conv).__name__}")
    w = conv.weight
    out = ScaledStdConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                          gamma=1.0, eps=STD_CONV_EPS, gain_init=gain_init, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.zero_()
    return out


def _convert_seq(mod: nn.Module) -> nn.Module:
    """Convert a stem piece: a conv, a norm (dropped), an activation (gamma-scaled), or a Sequential of those."""
    if isinstance(mod, nn.Sequential):
        for name, child in list(mod.named_children()):
            setattr(mod, name, _convert_seq(child))
        return mod
    if type(mod) is nn.Conv2d:
        return std_conv(mod)
    if _is_norm(mod):
        return nn.Identity()
    if _is_act(mod):
        return GammaAct(mod)
    return mod  # pooling, identity


def _avg_down(down: nn.Module) -> nn.Module:
    """A strided 1x1 shortcut conv becomes average pooling then the conv at stride 1 (timm's DownsampleAvg).

    Without BN the blocks start as their skip paths, and a strided 1x1 conv keeps one pixel in four at each
    transition: at 32x32, the network's output would depend only on the image's top-left corner at
    initialisation (an empty border on MNIST), and training stalls. NF-ResNets pool instead.
    """
    if not isinstance(down, nn.Sequential):
        return down
    convs = [m for m in down if isinstance(m, nn.Conv2d)]
    if len(convs) != 1 or convs[0].kernel_size != (1, 1) or convs[0].stride == (1, 1) or convs[0].dilation != (1, 1):
        return down
    conv = convs[0]
    pool = nn.AvgPool2d(conv.stride, conv.stride, ceil_mode=True, count_include_pad=False)
    conv.stride = (1, 1)
    return nn.Sequential(pool, conv)


def reinit(model: nn.Module) -> None:
    """timm NormFreeNet's initialisation: convs N(0, 1/fan_in) (gains and biases kept), classifier N(0, 0.01)."""
    from timm.layers import ScaledStdConv2d

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for m in model.modules():
        if isinstance(m, ScaledStdConv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)


# --- the NF residual block -------------------------------------------------------

class NFBlock(nn.Module):
    """Pre-activation normalizer-free residual block: ``shortcut + alpha * branch(act(h) / beta)``.

    ``shortcut`` is ``h`` itself, or at a transition the shortcut convolution of
    ``act(h) / beta``. The branch keeps the original block's convolutions (as
    scaled standardised convs), anti-aliasing, drop-block, squeeze-excitation
    (times 2, as timm's NF nets) and drop-path; its last conv's gain starts at 0.
    """

    def __init__(self, block: nn.Module, alpha: float, expected_var: float):
        super().__init__()
        from timm.models.resnet import BasicBlock, Bottleneck

        if not isinstance(block, (BasicBlock, Bottleneck)):
            raise TypeError(f"unsupported block {type(block).__name__}")
        self.bottleneck = isinstance(block, Bottleneck)
        self.alpha = float(alpha)
        self.expected_var = float(expected_var)  # of the block's input h
        self.beta = math.sqrt(expected_var)
        act = block.act1
        self.act_in = GammaAct(act)
        convs = ["conv1", "conv2", "conv3"] if self.bottleneck else ["conv1", "conv2"]
        for i, name in enumerate(convs):
            setattr(self, name, std_conv(getattr(block, name), gain_init=0.0 if i == len(convs) - 1 else 1.0))
        self.act1 = GammaAct(act, self.act_in.gamma)
        if self.bottleneck:
            self.act2 = GammaAct(act, self.act_in.gamma)
        self.aa = block.aa if block.aa is not None else nn.Identity()
        self.drop_block = block.drop_block if block.drop_block is not None else nn.Identity()
        self.se = block.se
        if self.se is not None and any(_is_norm(m) for m in self.se.modules()):
            raise TypeError("attention module with a norm layer")
        self.drop_path = block.drop_path if block.drop_path is not None else nn.Identity()
        self.downsample = _avg_down(_convert_seq(block.downsample)) if block.downsample is not None else None

    @property
    def last_conv(self) -> nn.Module:
        return self.conv3 if self.bottleneck else self.conv2

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the residual branch on the scaled pre-activation ``x = act(h) / beta``."""
        out = self.conv1(x)
        if self.bottleneck:
            out = self.conv2(self.act1(out))
            out = self.aa(self.act2(self.drop_block(out)))
            out = self.conv3(out)
        else:
            out = self.aa(self.act1(self.drop_block(out)))
            out = self.conv2(out)
        if self.se is not None:
            out = ATTN_GAIN * self.se(out)
        return self.drop_path(out)

    def shortcut(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return h if self.downsample is None else self.downsample(x)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.act_in(h) / self.beta
        return self.shortcut(h, x) + self.alpha * self.branch(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4f}"


# --- finding layers ---------------------------------------------------------------

_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_NORM_NAME = re.compile(r"(Batch|Group|Layer|Instance|Rms|RMS|Response|Switchable|Split)Norm|NormAct|^Norm$")


def _is_norm(m: nn.Module) -> bool:
    """Any normalization layer: torch's BN/IN/GN/LN and timm's (BatchNormAct2d, LayerNorm2d, FrozenBN, ...)."""
    if isinstance(m, _NORM_BASES):
        return True
    return _NORM_NAME.search(type(m).__name__) is not None


def _is_act(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn.modules.activation") or type(m).__name__ in (
        "Swish", "Mish", "GELU", "HardSwish", "HardSigmoid", "SiLU", "ReLU")


def norm_layers(model: nn.Module) -> list[str]:
    """Names of every normalization layer left in ``model``."""
    return [n for n, m in model.named_modules() if _is_norm(m)]


# --- conversion -------------------------------------------------------------------

STAGES = ("layer1", "layer2", "layer3", "layer4")


def convert_resnet(model: nn.Module, alpha: float = 0.2, images: torch.Tensor | None = None) -> nn.Module:
    """Convert a timm ``ResNet`` in place into a normalizer-free pre-activation ResNet; returns it.

    ``images`` (the backbone's normalised inputs), if given, calibrate the gains at the pooling points
    (:func:`calibrate`).

    Raises TypeError for a part it does not know (then nothing useful is left:
    callers convert a model they own).
    """
    from timm.models.resnet import ResNet

    if not isinstance(model, ResNet):
        raise TypeError(f"expected timm's ResNet, got {type(model).__name__}")
    # stem: conv1 (conv or deep Sequential) -> bn1 -> act1 -> maxpool (pool, or conv/bn/act, or Identity);
    # its last activation goes, as in NF-ResNets: the first block pre-activates.
    model.conv1 = _convert_seq(model.conv1)
    model.bn1 = nn.Identity()
    model.act1 = GammaAct(model.act1)
    model.maxpool = _convert_seq(model.maxpool)
    stem_acts = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, GammaAct) and n.split(".")[0] in ("conv1", "act1", "maxpool")]
    last_name = stem_acts[-1][0]
    _set(model, last_name, nn.Identity())
    expected_var = 1.0
    act = None
    for stage in STAGES:
        blocks = getattr(model, stage)
        for i, block in enumerate(blocks):
            nf = NFBlock(block, alpha, expected_var)
            blocks[i] = nf
            act = nf.act_in
            # a transition block's shortcut sees act(h)/beta (variance 1): the variance starts over
            expected_var = (1.0 if nf.downsample is not None else expected_var) + alpha ** 2
    last = getattr(model, STAGES[-1])
    setattr(model, STAGES[-1], nn.Sequential(OrderedDict(
        [(n, m) for n, m in last.named_children()] + [("act", GammaAct(act.act, act.gamma))])))
    reinit(model)
    left = norm_layers(model)
    if left:
        raise TypeError(f"normalization layers outside the stem and blocks: {', '.join(left[:3])}")
    if images is not None:
        calibrate(model, images)
    return model


def channel_variance(t: torch.Tensor) -> torch.Tensor:
    """The average over channels of each channel's variance over (N, H, W) (signal propagation plots' measure)."""
    return t.detach().transpose(0, 1).flatten(1).var(1, unbiased=False).mean()


def pooling_points(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(measured module, conv whose gain scales it), in depth order: the stem (its output is the input of
    ``layer1``) and every shortcut of a converted ResNet."""
    from timm.layers import ScaledStdConv2d

    stem = [m for n, m in model.named_modules()
            if isinstance(m, ScaledStdConv2d) and n.split(".")[0] in ("conv1", "maxpool")]
    points = [(model.maxpool, stem[-1])]
    for stage in STAGES:
        for block in getattr(model, stage):
            if isinstance(block, NFBlock) and block.downsample is not None:
                convs = [m for m in block.downsample.modules() if isinstance(m, ScaledStdConv2d)]
                points.append((block.downsample, convs[-1]))
    return points


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Scale the gain of each pooling point's conv so its output has unit :func:`channel_variance` on
    ``images``, one point after the other in depth order; returns the factors applied.

    Each output is linear in its conv's gain (zero bias; max-pool is positively homogeneous).
    """
    factors = []
    was_training = model.training
    model.eval()
    try:
        for measured, conv in pooling_points(model):
            seen = []
            handle = measured.register_forward_hook(lambda m, i, o: seen.append(channel_variance(o)))
            try:
                model(images)
            finally:
                handle.remove()
            factor = float(seen[0].clamp_min(1e-12).rsqrt())
            conv.gain.mul_(factor)
            factors.append(factor)
    finally:
        model.train(was_training)
    return factors


def calibration_images(run, n: int) -> torch.Tensor:
    """``n`` training images drawn with the run's seed, normalised as the backbone sees them; the global RNG
    is left as it was (a wrapped dataset may draw augmentations)."""
    ds = run.data.train
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(run.config.seed))[:n].tolist()
    with torch.random.fork_rng(devices=[]):
        x = torch.stack([ds[i][0] for i in idx]).float()
    return Normalize(run.data.mean, run.data.std)(x)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def is_normalizer_free(model: nn.Module) -> bool:
    from timm.models.nfnet import NormFreeNet

    return isinstance(model, NormFreeNet)


def target_for(name: str) -> str | None:
    """The timm NF counterpart of timm model ``name``, or None."""
    if name in COUNTERPARTS:
        return COUNTERPARTS[name]
    if REGNET.fullmatch(name):
        return REGNET_TARGET
    return None


# --- adaptive gradient clipping -------------------------------------------------

def agc_hook(param: nn.Parameter, clip: float, eps: float):
    """A gradient hook: AGC's unit-wise clip ``g * max(|W|, eps) * clip / |g|`` where ``|g|`` exceeds it."""
    from timm.utils.agc import unitwise_norm

    def hook(grad: torch.Tensor) -> torch.Tensor:
        max_norm = unitwise_norm(param.detach()).clamp(min=eps).mul(clip)
        grad_norm = unitwise_norm(grad)
        return torch.where(grad_norm < max_norm, grad, grad * (max_norm / grad_norm.clamp(min=1e-6)))

    return hook


def add_agc(model: nn.Module, clip: float, eps: float = 1e-3) -> int:
    """Clip every gradient but the classifier's with AGC; returns how many parameters are clipped."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    n = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in skip:
            p.register_hook(agc_hook(p, clip, eps))
            n += 1
    return n


# --- the hook ---------------------------------------------------------------------

@hookimpl
def on_model(model, run):
    cfg: Config = run.plugin_config("nf")
    src, mcfg = run.source, run.config.model
    if run.checkpoint_stage == "before":  # the checkpoint fitted the BN backbone: BN weights
        raise UsageError(f"{src}: model.checkpoint: a BN checkpoint cannot initialise an NF model (plugins.nf "
                         f"removes every BN layer and standardises the convolutions); expected null: train the NF "
                         f"model from scratch")
    if mcfg.pretrained:
        raise UsageError(f"{src}: model.pretrained: timm's pretrained weights of {mcfg.name!r} are BN weights and "
                         f"cannot initialise an NF model; expected false")
    if getattr(mcfg, "robustbench", None) is not None:
        raise UsageError(f"{src}: model.robustbench: plugins.nf supports {SUPPORTED}; a robustbench zoo model is "
                         f"none of these")
    name = mcfg.name
    if is_normalizer_free(model):
        run.log.info("nf: %s is already normalizer-free; kept as is", name)
        return None
    target = cfg.target or (target_for(name) if cfg.mode != "convert" else None)
    if target is not None:
        return _build(target, run, cfg)
    from timm.models.resnet import ResNet

    if cfg.mode == "build":
        raise UsageError(f"{src}: plugins.nf.mode: 'build' needs a timm NF counterpart and {name!r} has none; "
                         f"expected mode auto/convert or plugins.nf.target (counterparts: "
                         f"{', '.join(sorted(COUNTERPARTS))}, regnetx_*/regnety_*)")
    if not isinstance(model, ResNet):
        raise UsageError(f"{src}: model.name: plugins.nf supports {SUPPORTED}; got {name!r}")
    images = calibration_images(run, cfg.calibrate) if cfg.calibrate else None
    try:
        convert_resnet(model, cfg.alpha, images)
    except TypeError as e:
        raise UsageError(f"{src}: model.name: plugins.nf cannot convert {name!r} ({e}); it supports {SUPPORTED}") \
            from None
    run.log.info("nf: %s converted in place (alpha %g%s)", name, cfg.alpha,
                 f", pooling gains calibrated on {len(images)} training images" if images is not None else "")
    _maybe_agc(model, run, cfg)
    return model


def _build(target: str, run, cfg: Config) -> nn.Module:
    import timm

    src = run.source
    if not (timm.is_model(target) and is_normalizer_free_name(target)):
        raise UsageError(f"{src}: plugins.nf.target: expected one of timm's NF models "
                         f"({', '.join(timm.list_models('nf_*'))}), got {target!r}")
    try:
        model = timm.create_model(target, pretrained=False, num_classes=run.data.num_classes,
                                  **run.config.model.kwargs)
    except TypeError as e:
        raise UsageError(f"{src}: model.kwargs: {target} does not take them ({e})") from None
    if run.config.model.stem == "cifar":
        small_input_stem(model, f"{src}: model.stem")
    run.log.info("nf: %s built as timm's %s", run.config.model.name, target)
    _maybe_agc(model, run, cfg)
    return model


def _skip(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The skip path's output of an NF block on input ``h`` (normlab's NFBlock or timm's NormFreeBlock)."""
    if isinstance(block, NFBlock):
        return block.shortcut(h, block.act_in(h) / block.beta)
    return h if block.downsample is None else block.downsample(block.act1(h) * block.beta)


@torch.no_grad()
def branch_ratios(backbone: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Per residual block: RMS(output - skip) / RMS(skip) on ``images`` (normalised backbone inputs).

    0 at initialisation (the branch's last gain is 0); how far each branch has turned on since.
    """
    blocks = [(n, m) for n, m in backbone.named_modules() if isinstance(m, NFBlock)
              or type(m).__name__ == "NormFreeBlock"]
    ratios: dict[str, float] = {}

    def hook(name):
        def fn(mod, inputs, output):
            skip = _skip(mod, inputs[0]).float()
            branch = output.float() - skip
            ratios[name] = float(branch.pow(2).mean().sqrt() / skip.pow(2).mean().sqrt().clamp_min(1e-12))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in blocks]
    try:
        backbone(images)
    finally:
        for h in handles:
            h.remove()
    return ratios


@hookimpl
def on_epoch(model, ctx, metrics):
    run = ctx.run
    probe = run.state.get("nf_probe")
    if probe is None:  # 64 fixed training images, drawn with the run's seed
        probe = run.state["nf_probe"] = run.to_device(calibration_images(run, 64))
    ratios = branch_ratios(model.backbone, probe)
    for name, r in ratios.items():
        metrics[f"nf/branch_ratio/{name}"] = r
    if ratios:
        metrics["nf/branch_ratio/mean"] = sum(ratios.values()) / len(ratios)


def is_normalizer_free_name(name: str) -> bool:
    return name.startswith("nf_") or "nfnet" in name


def _maybe_agc(model: nn.Module, run, cfg: Config) -> None:
    if cfg.agc is not None:
        n = add_agc(model, cfg.agc, cfg.agc_eps)
        run.log.info("nf: adaptive gradient clipping (factor %g) on %d parameters", cfg.agc, n)
