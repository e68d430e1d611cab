"""Split a model at a named layer into a front and a tail, with tail(front(x)) == model(x).

timm backbones compute ``forward_features`` as a fixed sequence of top-level
stages and then ``forward_head``. For each supported family the sequence is
written out below (a stage container such as ``blocks`` is expanded into its
children), so the split points are those stages' names. A :class:`Split` is a
view: it owns no modules, looks them up by name at each call (so layers that
plugins replaced are used), and leaves the model's parameters where they are.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

__all__ = ["Split", "split_model", "split_points"]

# family class name -> [(attribute, expand its children?)], in forward_features order
_SEQUENCES: dict[str, list[tuple[str, bool]]] = {
    "ResNet": [("conv1", False), ("bn1", False), ("act1", False), ("maxpool", False),
               ("layer1", False), ("layer2", False), ("layer3", False), ("layer4", False)],
    "DenseNet": [("features", True)],
    "EfficientNet": [("conv_stem", False), ("bn1", False), ("blocks", True), ("conv_head", False),
                     ("bn2", False)],
    "RegNet": [("stem", False), ("s1", False), ("s2", False), ("s3", False), ("s4", False),
               ("final_conv", False)],
    "NormFreeNet": [("stem", False), ("stages", True), ("final_conv", False), ("final_act", False)],
}


def _family(backbone: nn.Module) -> str | None:
    for cls in type(backbone).__mro__:
        if cls.__name__ in _SEQUENCES:
            return cls.__name__
    return None


def split_points(backbone: nn.Module) -> list[str]:
    """The layer names ``backbone`` can be split after, in forward order.

    Raises ValueError naming the supported families for any other model.
    """
    family = _family(backbone)
    if family is None:
        raise ValueError(
            f"cannot split a {type(backbone).__name__}: supported families are "
            + ", ".join(sorted(_SEQUENCES))
        )
    names = []
    for attr, expand in _SEQUENCES[family]:
        module = getattr(backbone, attr)
        names.extend(f"{attr}.{child}" for child, _ in module.named_children()) if expand else names.append(attr)
    return names


class Split:
    """``front`` runs the model up to and including ``layer``; ``tail`` runs the rest.

    ``model`` is a normlab model (``model.normalize`` then ``model.backbone``) or
    a bare timm backbone. ``front`` applies input normalisation first.
    """

    def __init__(self, model: nn.Module, layer: str):
        self.model = model
        self.backbone = getattr(model, "backbone", model)
        self.normalize = getattr(model, "normalize", None) if self.backbone is not model else None
        points = split_points(self.backbone)
        if layer not in points:
            raise ValueError(f"cannot split {type(self.backbone).__name__} at {layer!r}; valid layers: "
                             + ", ".join(points))
        self.layer = layer
        cut = points.index(layer) + 1
        self.front_names, self.tail_names = points[:cut], points[cut:]

    def front(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:
            x = self.normalize(x)
        for name in self.front_names:
            x = self.backbone.get_submodule(name)(x)
        return x

    def tail(self, f: torch.Tensor) -> torch.Tensor:
        for name in self.tail_names:
            f = self.backbone.get_submodule(name)(f)
        return self.backbone.forward_head(f)

    def tail_modules(self) -> Iterator[nn.Module]:
        """The stages after the split, then the head's children (what :meth:`tail` runs)."""
        for name in self.tail_names:
            yield self.backbone.get_submodule(name)
        for name in ("global_pool", "head_drop", "fc", "classifier", "head"):
            if isinstance(getattr(self.backbone, name, None), nn.Module):
                yield getattr(self.backbone, name)

    def front_modules(self) -> Iterator[nn.Module]:
        for name in self.front_names:
            yield self.backbone.get_submodule(name)

    def front_parameters(self) -> Iterator[nn.Parameter]:
        for m in self.front_modules():
            yield from m.parameters()

    def tail_parameters(self) -> Iterator[nn.Parameter]:
        front = {id(p) for p in self.front_parameters()}
        return (p for p in self.backbone.parameters() if id(p) not in front)

    def tail_prefixes(self) -> list[str]:
        """Module-name prefixes (in the backbone) of everything after the split."""
        front = set(self.front_names)
        tops = {n.split(".")[0] for n in front}
        out = [n for n in self.tail_names]
        out += [n for n, _ in self.backbone.named_children() if n not in tops and n not in out]
        return out


def split_model(model: nn.Module, layer: str) -> Split:
    """Split ``model`` after ``layer``; see :class:`Split`."""
    return Split(model, layer)
