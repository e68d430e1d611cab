"""AugMix (Hendrycks, Mu, Cubuk, Zoph, Gilmer, Lakshminarayanan; ICLR 2020).

Each training image gets ``views`` AugMix views, ``m * x + (1 - m) * sum_i w_i * chain_i(x)``
with ``w ~ Dirichlet(alpha)`` and ``m ~ Beta(alpha, alpha)``, made by torchvision's
``AugMix`` on the uint8 image inside the DataLoader workers. By default the operations are
the paper's list, which leaves out the colour, contrast, brightness and sharpness operations
that overlap the -C corruptions (``all_ops: true`` adds them).

The batch reaches the forward as ``[clean; view 1; ...; view V]`` (3N rows for two views),
``y`` repeated to match and ``batch.extra["n_clean"] = N``. With ``loss: jsd`` the host's
``ce`` term is replaced by timm's ``JsdCrossEntropy``: CE on the clean rows plus
``jsd_alpha`` times the Jensen-Shannon divergence between the clean and augmented
predictions. With ``loss: ce`` the host's ``ce`` stays, the equal-weight CE over clean and
augmented rows (NoFrost* uses this with one view).

``split_bn: true`` gives augmented rows their own BN layers (copies of the clean ones) and
routes rows by ``ctx.route``; evaluation uses the clean BNs. normlab routes rows with
:class:`~normlab.layers.RoutedNorm` rather than timm's ``SplitBatchNorm2d``, which assumes
equal splits of every train-mode batch (a bnrect adaptation batch or an attacked sub-batch
would be cut into thirds).
"""

from __future__ import annotations

import torch
from normlab import hookimpl
from normlab.errors import UsageError
from normlab.layers import RoutedNorm
from torch.utils.data import Dataset

from .settings import Config

requires = ()
conflicts = ()
after = ()
knobs = ()


class AugMixViews(Dataset):
    """Wraps a dataset of ``(x, y)`` with x in [0, 1]; items become ``(x, y, {"views": (V, C, H, W)})``."""

    def __init__(self, dataset: Dataset, cfg: Config):
        from torchvision.transforms import AugMix

        self.dataset, self.views = dataset, cfg.views
        self.augmix = AugMix(severity=cfg.severity, mixture_width=cfg.width, chain_depth=cfg.depth,
                             alpha=cfg.alpha, all_ops=cfg.all_ops)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        image = x.mul(255).round_().to(torch.uint8)  # lossless for 8-bit sources
        views = torch.stack([self.augmix(image) for _ in range(self.views)]).float().div_(255)
        return x, y, {"views": views}


_SPLIT_BN_CLASHES = {
    "advbn": "advbn routes the tail BN layers by ctx.route already",
    "condition": "condition routes every BN layer by ctx.route already",
    "nf": "a normalizer-free model has no BN to split",
}


def _cfg(run) -> Config:
    return run.plugin_config("augmix")


@hookimpl
def on_model(model, run):
    cfg = _cfg(run)
    clash = [p for p in _SPLIT_BN_CLASHES if p in run.enabled] if cfg.split_bn else []
    if clash:
        raise UsageError(f"{run.source}: plugins.augmix.split_bn: expected false with plugin {clash[0]!r} "
                         f"({_SPLIT_BN_CLASHES[clash[0]]})")
    run.data.train = AugMixViews(run.data.train, cfg)
    run.data.train_workers = cfg.workers
    return None


@hookimpl
def on_batch_norm(name, module, model, run):
    if _cfg(run).split_bn:
        return RoutedNorm.copies(module, ("clean", "aug"))
    return None


@hookimpl
def on_batch(batch, ctx):
    views = batch.extra.pop("views", None)
    if views is None:  # a batch that did not come from the wrapped dataset
        return None
    n, v = batch.y.numel(), views.shape[1]
    batch.x = torch.cat([batch.x, views.transpose(0, 1).reshape(n * v, *views.shape[2:])])
    batch.y = batch.y.repeat(v + 1)
    batch.extra["n_clean"] = n
    if _cfg(ctx.run).split_bn:
        index = torch.zeros(n * (v + 1), dtype=torch.long, device=batch.x.device)
        index[n:] = 1  # sorted: each RoutedNorm splits the batch with views, no gather
        ctx.set_route(index, ("clean", "aug"))
    return batch


@hookimpl
def on_loss(batch, model, ctx, terms):
    cfg = _cfg(ctx.run)
    if cfg.loss != "jsd" or "n_clean" not in batch.extra:
        return
    from timm.loss import JsdCrossEntropy

    jsd = JsdCrossEntropy(num_splits=cfg.views + 1, alpha=cfg.jsd_alpha,
                          smoothing=ctx.run.config.train.label_smoothing)
    terms.replace("ce", jsd(batch.logits.float(), batch.y))
