"""Building the model: a timm backbone behind an input-normalisation layer, reshaped by plugins."""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .errors import UsageError
from .layers.fold import relayout
from .layers.norm import map_norms

__all__ = ["Normalize", "NormlabNet", "create_backbone", "small_input_stem", "input_stats", "robustbench_backbone",
           "load_state_file", "load_weights", "set_trainable"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: inputs stay in [0, 1] outside the model."""

    def __init__(self, mean: Iterable[float], std: Iterable[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormlabNet(nn.Module):
    """The model normlab trains and attacks: ``backbone(normalize(x))`` on [0, 1] inputs.

    Layer names used in run files (split points, trainable prefixes, norm names
    passed to hooks) are relative to ``backbone``. A channels-last model
    (``memory_format``, set by the host from ``train.channels_last``) takes any
    input in that layout and hands the input's gradient back in the input's own:
    attacks (torchattacks ``view`` their input gradients) see a contiguous model.
    """

    def __init__(self, backbone: nn.Module, mean: Iterable[float], std: Iterable[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.memory_format = torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_format is torch.channels_last:
            x = relayout(x, torch.channels_last)
        return self.backbone(self.normalize(x))


def create_backbone(cfg: Any, num_classes: int, source: str) -> nn.Module:
    """``timm.create_model`` with run-file errors (unknown name, weights unavailable offline).

    With ``model.robustbench`` set, the backbone is that robustbench zoo model
    instead (:func:`robustbench_backbone`).
    """
    if cfg.robustbench is not None:
        return robustbench_backbone(cfg.robustbench, num_classes, source)
    import timm

    if not timm.is_model(cfg.name):
        from normlab_registry import did_you_mean

        raise UsageError(f"{source}: model.name: unknown timm model {cfg.name!r}"
                         + did_you_mean(cfg.name, timm.list_models()))
    from .adapters.hub import offline_unless_reachable

    try:
        with offline_unless_reachable() if cfg.pretrained else contextlib.nullcontext():
            model = timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=num_classes, **cfg.kwargs)
    except TypeError as e:
        raise UsageError(f"{source}: model.kwargs: {e}") from None
    except Exception as e:
        if not cfg.pretrained:
            raise
        raise UsageError(
            f"{source}: model.pretrained: timm's pretrained weights for {cfg.name!r} are not available "
            f"({type(e).__name__}); without a network, put them in the Hugging Face cache (HF_HOME) or "
            f"set model.checkpoint to a weights file"
        ) from None
    return small_input_stem(model, f"{source}: model.stem") if cfg.stem == "cifar" else model


def top_level_layers(backbone: nn.Module) -> str:
    """The backbone's top-level layer names, for errors about a layer it lacks."""
    return ", ".join(name for name, _ in backbone.named_children())


def check_input(model: nn.Module, channels: int, size: int, cfg: Any, source: str) -> None:
    """Refuse, before anything is written, a model that cannot take the run's inputs.

    One eval-mode, no-grad forward of two blank ``channels x size x size`` images (no parameter, BN
    statistic or RNG state changes): a ``model.kwargs.in_chans`` that is not the data's channels, a ViT
    whose ``img_size`` is not ``data.image_size``, a stem that shrinks the input to nothing. Without it the
    first training step failed, after the run directory was written.
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, channels, size, size))
    except Exception as e:  # any failure here is the run file's model against its own data
        text = (str(e).strip().splitlines() or [""])[0][:240]
        raise UsageError(f"{source}: model.name: {cfg.name!r} cannot take this run's {channels}x{size}x{size} "
                         f"images (data.image_size, the data's channels, model.kwargs): {type(e).__name__}: "
                         f"{text}") from None
    finally:
        model.train(was)


def small_input_stem(model: nn.Module, where: str = "model.stem") -> nn.Module:
    """The CIFAR form of an ImageNet stem, in place: at 32 px, layer1..layer4 see 32/16/8/4 pixels.

    - timm ResNet (plain stem): ``conv1`` becomes a 3x3 stride-1 conv with the same channels (He et
      al.'s CIFAR ResNets, and the seeds' CIFAR code), ``maxpool`` the identity. A deep stem
      (``resnet50d``, a Sequential ``conv1``) keeps its convs with the first at stride 1.
    - timm NormFreeNet (``nf_resnet26``, ...): ``stem.conv`` becomes a 3x3 stride-1 ScaledStdConv2d,
      ``stem.pool`` the identity.
    - timm EfficientNet (and MobileNetV3): ``conv_stem`` (already 3x3) at stride 1.

    A new first conv is initialised as timm initialises its model's convs; pretrained weights for
    it are dropped. Anything else is a UsageError naming what is supported.
    """
    from timm.layers import ScaledStdConv2d

    def conv3x3(old: nn.Conv2d) -> nn.Conv2d:
        kind = type(old)
        new = kind(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
        if kind is nn.Conv2d:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        return new

    kind = type(model).__name__
    if kind == "ResNet" and hasattr(model, "maxpool"):
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = conv3x3(model.conv1)
        else:  # deep stem: a Sequential of convs
            first = next(m for m in model.conv1.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        model.maxpool = nn.Identity()
    elif kind == "NormFreeNet" and isinstance(getattr(getattr(model, "stem", None), "conv", None), ScaledStdConv2d):
        model.stem.conv = conv3x3(model.stem.conv)
        if hasattr(model.stem, "pool"):
            model.stem.pool = nn.Identity()
    elif kind in ("EfficientNet", "MobileNetV3") and isinstance(getattr(model, "conv_stem", None), nn.Conv2d):
        model.conv_stem.stride = (1, 1)
    else:
        raise UsageError(f"{where}: 'cifar' is defined for timm ResNet, NormFreeNet (nf_resnet*) and "
                         f"EfficientNet/MobileNetV3 models; {kind} is none of them")
    return model


def input_stats(cfg: Any, data: Any, source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of the model's :class:`Normalize` layer for run config ``cfg`` and data bundle ``data``.

    The data's statistics for a timm backbone; the identity (mean 0, std 1) for
    a robustbench zoo model, which takes [0, 1] inputs and normalises them itself.
    """
    if cfg.model.robustbench is None:
        return tuple(data.mean), tuple(data.std)
    for key in ("mean", "std"):
        if getattr(cfg.data, key) is not None:
            raise UsageError(f"{source}: data.{key}: not used with model.robustbench (a robustbench zoo model "
                             f"normalises its [0, 1] inputs itself); leave it unset")
    channels = len(data.mean)
    return (0.0,) * channels, (1.0,) * channels


def robustbench_backbone(rb_cfg: Any, num_classes: int, source: str) -> nn.Module:
    """A robustbench zoo model loaded by ``robustbench.utils.load_model`` from its offline checkpoint.

    The checkpoint must already be at ``{model_dir}/{dataset}/{threat_model}/{name}.pt``
    (ensembles: ``{name}.pt_m{i}.pt``): a missing file is a one-line UsageError,
    never a download. Zoo entries whose weights robustbench takes from timm
    (the XCiT models) or torchvision (ImageNet ``Standard_R50``) need those
    libraries' caches instead.
    """
    import warnings

    from .adapters.robustbench import RobustbenchUnavailable, import_robustbench

    key = "model.robustbench"
    try:
        import_robustbench()
    except RobustbenchUnavailable as e:
        raise UsageError(f"{source}: {key}: {e}") from None
    import timm
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import DATASET_CLASSES, load_model

    dataset, threat = BenchmarkDataset(rb_cfg.dataset), ThreatModel(rb_cfg.threat_model)
    zoo = model_dicts[dataset][threat]
    name = rb_cfg.name
    if name not in zoo:
        from normlab_registry import did_you_mean

        raise UsageError(f"{source}: {key}.name: {name!r} is not in robustbench's {dataset.value}/{threat.value} "
                         f"model zoo" + did_you_mean(name, list(zoo)))
    classes = DATASET_CLASSES[dataset]
    if classes != num_classes:
        raise UsageError(f"{source}: {key}.dataset: a {dataset.value} zoo model has {classes} classes but the "
                         f"run's data has {num_classes}")
    entry = zoo[name]
    timm_name = f"{name.lower().replace('-', '_')}_{dataset.value.lower()}_{threat.value.lower()}"
    folder = Path(rb_cfg.model_dir).expanduser() / dataset.value / threat.value
    if timm.is_model(timm_name):
        where = f"timm's pretrained weights for {timm_name!r} (the Hugging Face cache, HF_HOME)"
    elif dataset == BenchmarkDataset.imagenet and "Standard" in name:
        where = "torchvision's pretrained weights (the torch hub cache, TORCH_HOME)"
    else:
        ids = entry["gdrive_id"]
        files = [folder / f"{name}.pt"] if not isinstance(ids, list) else [
            folder / f"{name}.pt_m{i}.pt" for i in range(len(ids))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UsageError(f"{source}: {key}.name: no checkpoint for robustbench model {name!r}: expected "
                             f"{', '.join(str(f) for f in missing)} (robustbench's layout "
                             f"MODEL_DIR/{dataset.value}/{threat.value}/{name}.pt; normlab does not download it)")
        where = ", ".join(str(f) for f in files)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(name, model_dir=str(Path(rb_cfg.model_dir).expanduser()), dataset=dataset,
                               threat_model=threat)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        hint = (" (the file holds more than tensors: torch.load's weights_only default refuses it; "
                "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 lifts that for a file you trust)"
                if "weights_only" in str(e) else "")
        raise UsageError(f"{source}: {key}.name: cannot load robustbench model {name!r} from {where} "
                         f"({type(e).__name__}: {first}){hint}") from None
    return model


def load_state_file(path: str | Path, source: str, key: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, a .pt/.pth/.bin (``weights_only=True``), or a run directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        from .checkpoint import latest_model_file

        found = latest_model_file(path)
        if found is None:
            raise UsageError(f"{source}: {key}: {str(path)!r} is not a normlab run directory with a checkpoint")
        path = found
    if not path.is_file():
        raise UsageError(f"{source}: {key}: no such file {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns about old pickle protocols before refusing them
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{source}: {key}: cannot read {str(path)!r} as weights: a pickle that holds more than "
                         f"tensors, which normlab does not unpickle (torch.load weights_only); save its state dict, "
                         f"or convert it to .safetensors where it was made") from None
    except Exception as e:
        raise UsageError(f"{source}: {key}: cannot read {str(path)!r} as weights "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{source}: {key}: {str(path)!r} does not hold a state dict of tensors")
    return state


def _target(model: NormlabNet, state: dict[str, torch.Tensor]) -> nn.Module:
    return model if any(k.startswith("backbone.") for k in state) else model.backbone


def weights_mismatch(model: NormlabNet, state: dict[str, torch.Tensor]) -> str | None:
    """Why a normlab (``backbone.*``) or plain timm state dict does not fit ``model``; None when it fits."""
    from .checkpoint import state_dict_mismatch

    return state_dict_mismatch(_target(model, state).state_dict(), state)


def load_weights(model: NormlabNet, state: dict[str, torch.Tensor], source: str, key: str) -> None:
    """Load a normlab (``backbone.*``) or plain timm state dict strictly, with a one-line error on mismatch."""
    problem = weights_mismatch(model, state)
    if problem:
        raise UsageError(f"{source}: {key}: weights do not fit the model: {problem}")
    _target(model, state).load_state_dict(state, strict=True)


def apply_norm_hooks(backbone: nn.Module, hooks: Any, run: Any) -> int:
    """Offer every norm layer to ``on_batch_norm``; return how many were replaced."""
    if not hooks.implemented("on_batch_norm"):
        return 0
    return map_norms(backbone, lambda name, m: hooks.call("on_batch_norm", name=name, module=m,
                                                          model=backbone, run=run))


def set_trainable(model: NormlabNet, prefixes: list[str] | None, source: str) -> list[nn.Parameter]:
    """Freeze every backbone parameter outside ``prefixes``; return the trainable ones."""
    if prefixes is None:
        return [p for p in model.parameters() if p.requires_grad]
    names = [n for n, _ in model.backbone.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix.rstrip(".") + ".") for n in names):
            raise UsageError(f"{source}: model.trainable: no parameter name starts with {prefix!r}")
    params = []
    for n, p in model.backbone.named_parameters():
        keep = any(n == pre or n.startswith(pre.rstrip(".") + ".") for pre in prefixes)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    return params
