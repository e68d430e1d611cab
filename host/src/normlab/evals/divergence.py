"""``divergence``: feature divergence between the clean test split and shifted domains.

AdvBN paper, section 5.3: at each layer, model every channel's activations in a
domain as a normal distribution with that channel's mean and standard
deviation (over samples and positions), and report the mean over channels of
the symmetric KL divergence ``KL(A||B) + KL(B||A)`` between the clean domain A
and a shifted domain B. For normals,
``KL(A||B) = log(sB/sA) + (sA^2 + (mA - mB)^2) / (2 sB^2) - 1/2``.
Variances are floored (see :func:`symmetric_kl`) because post-ReLU channels
can be silent in one domain.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from ..layers.norm import iter_norms
from ..layers.split import split_points
from ..model import top_level_layers
from ..plots import save
from ..train import autocast
from . import Evaluator, examples
from .settings import DivergenceConfig, StyleConfig
from .style import generated_domain


def symmetric_kl(mean_a, var_a, mean_b, var_b, floor: float = 1e-3) -> torch.Tensor:
    """Mean over channels of KL(A||B) + KL(B||A) between per-channel normals.

    Variances are floored at ``floor`` times the layer's mean channel variance
    (both domains), so a channel that a ReLU silences in one domain gives a
    large but finite term instead of dominating the layer's mean.
    """
    eps = floor * torch.cat([var_a, var_b]).mean().clamp(min=1e-12)
    var_a, var_b = var_a.clamp(min=eps), var_b.clamp(min=eps)
    d2 = (mean_a - mean_b) ** 2
    kl_ab = 0.5 * torch.log(var_b / var_a) + (var_a + d2) / (2 * var_b) - 0.5
    kl_ba = 0.5 * torch.log(var_a / var_b) + (var_b + d2) / (2 * var_a) - 0.5
    return (kl_ab + kl_ba).mean()


class ChannelStats:
    """Running per-channel sums of a layer's output (float64), for mean and variance."""

    def __init__(self):
        self.n = 0
        self.s = self.s2 = None

    def __call__(self, module, inputs, output):
        f = output.detach().double().transpose(0, 1).flatten(1)  # C x (N*H*W)
        self.s = f.sum(1) if self.s is None else self.s + f.sum(1)
        self.s2 = (f * f).sum(1) if self.s2 is None else self.s2 + (f * f).sum(1)
        self.n += f.shape[1]

    def mean_var(self):
        mean = self.s / self.n
        return mean, (self.s2 / self.n - mean * mean).clamp(min=0)


def default_layers(backbone) -> list[str]:
    try:
        return split_points(backbone)
    except ValueError:
        return [name for name, _ in iter_norms(backbone)]


@contextmanager
def recording(backbone, layers: list[str]):
    stats = {name: ChannelStats() for name in layers}
    handles = [backbone.get_submodule(name).register_forward_hook(stats[name]) for name in layers]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def domain_stats(run, ctx, name: str, x: torch.Tensor, layers: list[str], batch_size: int,
                 samples: tuple[torch.Tensor, torch.Tensor]):
    """Per-layer (mean, var) of the features of images ``x``, inside ``run.domain(name, *samples)``."""
    model = run.model
    with run.domain(name, samples[0], ctx, samples[1]), ctx.active(), recording(model.backbone, layers) as stats:
        for i in tqdm(range(0, len(x), batch_size), desc=f"divergence {name}", leave=False, disable=run.quiet):
            with autocast(run.device, run.config.train.amp):
                model(run.to_device(x[i:i + batch_size]))
    return {k: v.mean_var() for k, v in stats.items()}


def check_model(run, cfg: DivergenceConfig) -> None:
    """Once the model is built (before training): every named layer exists."""
    known = dict(run.model.backbone.named_modules())
    unknown = [layer for layer in cfg.layers or () if layer not in known]
    if unknown:
        raise UsageError(f"{run.source}: {cfg.key}.layers: the backbone has no layer {unknown[0]!r} "
                         f"(its top-level layers: {top_level_layers(run.model.backbone)})")


def divergence(model, ctx, report, cfg: DivergenceConfig) -> None:
    run = ctx.run
    layers = cfg.layers or default_layers(model.backbone)
    model.eval()
    n = examples(run, cfg)
    clean = torch.cat([x for x, _ in run.data.loader("test", 1024, shuffle=False, n=n)])
    ref = domain_stats(run, ctx, "clean", clean, layers, cfg.batch_size, run.domain_samples())
    curves = {}
    for d in cfg.domains:
        x, _, samples = generated_domain(run, d, StyleConfig(n_examples=n, seed=cfg.seed))
        other = domain_stats(run, ctx, f"style/{d}", x, layers, cfg.batch_size, samples)
        values = [float(symmetric_kl(*ref[layer], *other[layer])) for layer in layers]
        for layer, v in zip(layers, values):
            report.add(f"divergence/{d}/{layer}", v)
        report.add(f"divergence/{d}/mean", sum(values) / len(values))
        curves[d] = values
    if run.dir is not None:
        report.plots["divergence"] = str(plot(curves, layers, run.dir / "plots" / "divergence.png"))


def plot(curves: dict[str, list[float]], layers: list[str], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(layers) + 2), 3.6))
    for d, values in curves.items():
        ax.plot(range(len(layers)), values, marker="o", label=f"clean vs {d}")
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set(ylabel="symmetric KL (mean over channels)", title="feature divergence by layer", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


EVALUATORS = [Evaluator("divergence", divergence,
                        "per-layer symmetric KL of per-channel feature statistics, clean vs shifted domains",
                        check_model=check_model)]
