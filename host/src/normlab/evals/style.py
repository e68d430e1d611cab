"""``style``: appearance-shift domains that keep the object and change its look.

For the embedded digits (white strokes on black), three generated domains:

- ``invert``: ``1 - x`` (black digits on white).
- ``color``: the stroke intensity blends a random foreground colour over a random
  background colour, one pair per image: one colour has every channel in
  [0.7, 1], the other in [0, 0.3], and which one is the digit is a coin flip.
- ``texture``: MNIST-M-like: ``|patch - x|`` where ``patch`` is a random 32x32
  crop of one of scikit-image's bundled natural images (astronaut, chelsea,
  coffee, rocket, brick, grass, gravel), as MNIST-M blends digits into BSDS500
  patches.

Each domain is drawn once from ``seed``, so every run sees the same images. For
ImageNet-style data, ``folders`` names ImageFolder trees (Sketch, Stylized, ...)
with the same classes as the training data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import fixed_order
from ..errors import UsageError
from ..train import evaluate_accuracy
from . import Evaluator, examples
from .settings import GENERATED, StyleConfig

TEXTURE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "brick", "grass", "gravel")


def invert(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1.0 - x


def color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    light = 0.7 + 0.3 * torch.rand(n, 3, 1, 1, generator=g)
    dark = 0.3 * torch.rand(n, 3, 1, 1, generator=g)
    swap = torch.rand(n, 1, 1, 1, generator=g) < 0.5  # light digits on dark, or the reverse
    fg, bg = torch.where(swap, dark, light), torch.where(swap, light, dark)
    alpha = x.mean(1, keepdim=True)
    return alpha * fg + (1 - alpha) * bg


_TEXTURES: list[torch.Tensor] = []


def _textures() -> list[torch.Tensor]:
    if not _TEXTURES:
        import skimage.data

        for name in TEXTURE_IMAGES:
            img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            _TEXTURES.append(torch.from_numpy(img[..., :3]).permute(2, 0, 1).contiguous())
    return _TEXTURES


def texture(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    textures = _textures()
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        tex = textures[int(torch.randint(len(textures), (1,), generator=g))]
        top = int(torch.randint(tex.shape[1] - h + 1, (1,), generator=g))
        left = int(torch.randint(tex.shape[2] - w + 1, (1,), generator=g))
        out[i] = (tex[:, top:top + h, left:left + w] - x[i]).abs()
    return out


SHIFTS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "invert": invert, "color": color, "texture": texture,
}


def generated_domain(run, name: str, cfg: StyleConfig):
    """``(images, labels, (samples, positions))`` of generated domain ``name``, over the test split's fixed order.

    ``images`` are its first ``n_examples`` rows (the evaluated subset), ``samples`` its first
    ``adapt_samples`` (the adaptation samples) and ``positions`` their test-split positions. The rows
    made are as many as the larger needs, drawn in order from ``seed`` in whole blocks of 1,024, so a
    row does not depend on how many rows are used.
    """
    total = len(run.data.test)
    n = examples(run, cfg)
    need = max(n, min(run.config.adapt_samples, total))
    loader = run.data.loader("test", 1024, shuffle=False, n=min(total, -(-need // 1024) * 1024))  # whole blocks
    g = torch.Generator().manual_seed(cfg.seed * 1009 + GENERATED.index(name))
    xs, ys = [], []
    for x, y in loader:
        xs.append(SHIFTS[name](x, g).clamp_(0, 1))
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    k = run.config.adapt_samples
    return x[:n], y[:n], (x[:k], fixed_order(total)[:k])


def _folder_loader(run, name: str, path: str, cfg: StyleConfig):
    from torchvision import datasets
    from torchvision import transforms as T

    root = Path(path).expanduser()
    size = run.data.image_size
    ds = datasets.ImageFolder(root, T.Compose([T.Resize(int(round(size / 0.875))), T.CenterCrop(size),
                                                 T.ToTensor()]))
    train_classes = getattr(run.data.test, "classes", None)
    if train_classes is not None and ds.classes != train_classes:
        raise UsageError(f"{run.source}: {cfg.key}.folders.{name}: classes differ from the training data")
    samples = run.domain_samples(ds)
    ds = torch.utils.data.Subset(ds, fixed_order(len(ds))[:examples(run, cfg, len(ds), f"folder {name}")].tolist())
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False), samples


def domains(run, cfg: StyleConfig) -> list[str]:
    # the names and the folders were checked with the settings (evals/settings.py), before training
    return cfg.domains if cfg.domains is not None else (list(GENERATED) if run.data.name == "mnist" else [])


def style(model, ctx, report, cfg: StyleConfig) -> None:
    run = ctx.run
    names = domains(run, cfg)
    if not names and not cfg.folders:
        raise UsageError(f"{run.source}: {cfg.key}: no domains: name generated `domains` or ImageFolder "
                         f"`folders` (generated domains default to all only for mnist)")
    keys = []
    for name in names:
        x, y, (samples, positions) = generated_domain(run, name, cfg)
        loader = [(x[i:i + cfg.batch_size], y[i:i + cfg.batch_size]) for i in range(0, len(y), cfg.batch_size)]
        with run.domain(f"style/{name}", samples, ctx, positions):
            scores = evaluate_accuracy(run, loader, desc=f"style/{name}", ctx=ctx)
        report.accuracy(f"style/{name}/acc", scores.correct, scores.labels)
        keys.append(f"style/{name}/acc")
    for name, path in cfg.folders.items():
        loader, (samples, positions) = _folder_loader(run, name, path, cfg)
        with run.domain(f"style/{name}", samples, ctx, positions):
            scores = evaluate_accuracy(run, loader, desc=f"style/{name}", ctx=ctx)
        report.accuracy(f"style/{name}/acc", scores.correct, scores.labels)
        keys.append(f"style/{name}/acc")
    report.mean_accuracy("style/acc", keys)


EVALUATORS = [Evaluator("style", style, "accuracy on appearance-shifted domains of the test split")]
