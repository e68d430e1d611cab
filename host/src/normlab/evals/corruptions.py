"""``corruptions``: accuracy under the 15 ImageNet-C corruptions at 5 severities.

Two sources of corrupted images (setting ``source``):

- ``generate`` (default): imagecorruptions (adapted for NumPy 2, see
  :mod:`normlab.adapters.imagecorruptions`) applied to the run's test split,
  generated once in worker processes and cached on disk (below). These are the
  ImageNet-C corruptions and constants; on 32x32 images they are not the
  released CIFAR-10-C files (those used constants scaled for 32 pixels), so
  compare generated numbers with generated numbers.
- ``robustbench``: the released CIFAR-10-C, CIFAR-100-C or ImageNet-C, read by
  robustbench's ``load_cifar10c`` / ``load_cifar100c`` / ``load_imagenetc`` from
  ``data_dir`` (data ``cifar10``, ``cifar100``, ``imagefolder`` respectively).
  Nothing is downloaded: a missing folder is a usage error. ``n_examples`` n
  takes what those loaders take: the first n rows of each severity (CIFAR: the
  first n test images, at most 10,000), or the first n of robustbench's fixed
  list of 5,000 ImageNet validation images (at most 5,000); the clean reference
  is the same images from the run's test split, and their labels must match.

The cache (``cache_dir``, default ``$NORMLAB_DATA/corruptions`` or
``~/.cache/normlab/data/corruptions``) holds one folder per dataset split::

    {cache_dir}/{key}/                 key: mnist-test, cifar10-test, cifar100-test,
                                            imagefolder-<hash of root>-val-<size>px
        meta.json                      what the folder holds, and how many rows are filled
        index.npy                      int64 (N,): the test-set index of each row
        clean.npy                      uint8 (N, H, W, 3): the uncorrupted images, same rows
        CIFAR-10-C/                    CIFAR-100-C/ for cifar100, ImageFolder-C/ for imagefolder
            labels.npy                 uint8 (5R,) (int64 above 256 classes)
            {corruption}.npy           uint8 (5R, H, W, 3)

``CIFAR-10-C/`` is exactly the layout of the released CIFAR-10-C, so
robustbench's own loader reads it::

    load_cifar10c(n, severity, data_dir="{cache_dir}/mnist-test", corruptions=[...])

Severity s occupies rows (s-1)*R .. (s-1)*R + N of each file, where R is the
number of rows per severity block. robustbench's loader assumes R = 10,000 (it
slices ``[(s-1)*10000 : s*10000]`` whatever the file holds), so for CIFAR-10-C
and CIFAR-100-C folders R = max(N, 10,000): a split of fewer than 10,000 images
(the embedded MNIST test split has 1,000) fills the first N rows of each block
and leaves the rest zero. The files are created sparse, so the padding takes
no disk space on Linux file systems. ``labels.npy`` repeats the labels per block,
as in the released files. For ImageFolder-C, R = N.

Row j is test image ``index[j]``, where ``index`` is the fixed draw
``torch.randperm(N, seed 0)`` that :meth:`normlab.data.DataBundle.loader` uses
for ``n_examples``: the first n rows are exactly the n images the other
evaluators use with ``n_examples: n``, and robustbench's loader with n_examples
n returns those same n images. Every image is corrupted with a NumPy seed made
from (0, corruption, severity, test index), so a row does not depend on the
worker that made it nor on how many rows were made: a later run that asks for
more images fills more rows (``meta.json`` counts them per file) and a cache
never needs rebuilding. Files are written under a lock: new ones through a
temporary name and ``os.replace``; rows added to an existing file count only
once ``meta.json`` (replaced atomically) says so.

Images smaller than 32 pixels are enlarged to 32 before corruption (the cache
holds the enlarged images) and every image goes back to the run's
``data.image_size`` at evaluation, as the clean test images do.

Evaluation runs per corruption and severity inside
``run.domain("corruptions/NAME/SEVERITY", samples)`` (so ``on_domain``
plugins such as BN rectification adapt to each domain and are undone after;
the samples are the cache's first ``adapt_samples`` rows, that is the first of
the fixed random order, generated even when ``n_examples`` is smaller; for the
released sets, the test split's fixed draw as for the clean domain, or the
first of robustbench's ImageNet list, itself a fixed random draw) and
the clean reference inside ``run.domain("clean", ...)``, through
:func:`normlab.train.evaluate_accuracy` (eval mode, the context active, bf16
autocast on CUDA). Images come from the memory-mapped ``.npy`` files in chunks of
up to 256 MB, move to the device as uint8 and become floats there.

Metrics (accuracies and errors are fractions):

- ``corruptions/NAME/SEVERITY/acc`` for every corruption and severity;
- ``corruptions/NAME/acc``: mean over the severities;
- ``corruptions/acc``: mean over all; ``corruptions/error`` = 1 - that (mean
  corruption error);
- ``corruptions/clean_acc``: the same images uncorrupted, same path;
- ``corruptions/drop`` = clean_acc - acc; ``corruptions/relative_drop`` =
  drop / clean_acc;
- ImageNet-C only (data ``imagefolder``, source ``robustbench``, all five
  severities): ``corruptions/NAME/ce`` = sum_s err(NAME, s) / sum_s err_AlexNet(NAME),
  where REFERENCE gives one AlexNet error per corruption (its mean over the five
  severities), so the denominator is 5 times that constant; robustbench's
  ``corruptions_evaluation`` computes the same quantity. ``corruptions/mce`` is
  the mean CE over the 15 corruptions, written only when all 15 ran.

A heat map of accuracy by corruption and severity goes to
``RUN_DIR/plots/corruptions.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import fixed_order
from ..errors import UsageError
from ..results import unwritable_folder
from ..train import evaluate_accuracy
from . import Evaluator, examples
from .settings import COMMON, VALIDATION, CorruptionsConfig

__all__ = [
    "ALEXNET_ERR",
    "COMMON",
    "VALIDATION",
    "CorruptionCache",
    "CorruptionsConfig",
    "cache_key",
    "corruptions",
    "heatmap",
]

log = logging.getLogger("normlab")

#: AlexNet's ImageNet-C error per corruption (mean over severities), from REFERENCE.md
ALEXNET_ERR = dict(zip(COMMON, (0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
                                0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840,
                                0.606500)))

LAYOUT = 1  # version of the cache layout written into meta.json
SEED = 0  # generation seed (part of the cache's identity)
ROBUSTBENCH_ROWS = 10_000  # robustbench's load_corruptions_cifar: rows per severity block (n_total_cifar)
CHUNK_BYTES = 256 << 20  # images moved to the device at once


def _default_cache() -> str:
    from ..data import _default_root

    return str(_default_root() / "corruptions")


# --------------------------------------------------------------------------- source images


class _SplitImages:
    """The test split as uint8 (H, W, 3) images at native size (at least 32 px), fetched by index."""

    def __init__(self, data):
        from ..data import TensorImages

        ds = data.test
        self.n = len(ds)
        self.num_classes = data.num_classes
        if isinstance(ds, TensorImages):  # embedded mnist: uint8 (N, 3, 32, 32) in memory
            self._get = lambda idx: ds.images[torch.as_tensor(idx)].permute(0, 2, 3, 1).numpy()
            self._labels = ds.labels.numpy()
        elif isinstance(getattr(ds, "data", None), np.ndarray) and ds.data.dtype == np.uint8 and ds.data.ndim == 4:
            self._get = lambda idx: ds.data[np.asarray(idx)]  # torchvision CIFAR: uint8 (N, 32, 32, 3)
            self._labels = np.asarray(ds.targets)
        else:  # ImageFolder and others: the test transform's output (floats from uint8 pixels), quantised back
            self._get = lambda idx: np.stack([_to_uint8(ds[int(i)][0]) for i in idx])
            targets = getattr(ds, "targets", None)
            self._labels = np.asarray(targets) if targets is not None else None
            self._ds = ds
        first = self.images(np.array([0]))
        self.shape = first.shape[1:]

    def images(self, idx: np.ndarray) -> np.ndarray:
        from ..adapters.imagecorruptions import at_least_32

        out = self._get(idx)
        if min(out.shape[1:3]) < 32:
            out = np.stack([at_least_32(np.ascontiguousarray(im)) for im in out])
        return np.ascontiguousarray(out)

    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.asarray([int(self._ds[i][1]) for i in range(self.n)])
        return self._labels.astype(np.int64)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def cache_key(data, config_data: Any = None) -> tuple[str, str]:
    """(folder name under cache_dir, name of the corruption folder) for a run's data."""
    name = data.name
    if name in ("mnist", "cifar10"):
        return f"{name}-test", "CIFAR-10-C"
    if name == "cifar100":
        return "cifar100-test", "CIFAR-100-C"
    root = getattr(config_data, "root", None) or ""
    digest = hashlib.sha1(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:10]
    return f"{name}-{digest}-val-{data.image_size}px", "ImageFolder-C"


# --------------------------------------------------------------------------- the cache


def _load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """A cache file as numpy reads it (never unpickled); one line naming it when it is not a .npy array (a
    truncated or replaced file)."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path}: not a corruption-cache array ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:100]}); rebuild it with the corruptions evaluator's "
                         f"regenerate: true, or delete that folder") from None


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class CorruptionCache:
    """One dataset split's corrupted images on disk (layout: the module docstring).

    ``ensure(names, n)`` generates what is missing; ``clean(n)`` and
    ``get(name, severity, n)`` return memory-mapped uint8 (n, H, W, 3) arrays and
    int64 labels.
    """

    def __init__(self, root: Path, folder: str, source: _SplitImages, dataset: str = ""):
        self.root, self.folder, self.source, self.dataset = Path(root), folder, source, dataset
        self.dir = self.root / folder
        n = source.n
        self.rows = max(n, ROBUSTBENCH_ROWS) if folder in ("CIFAR-10-C", "CIFAR-100-C") else n
        self._maps: dict[str, np.ndarray] = {}
        self._labels: np.ndarray | None = None
        #: what the last ensure() did: {file: (first row, last row)}, and seconds spent generating
        self.generated: dict[str, tuple[int, int]] = {}
        self.seconds = 0.0

    # -- metadata
    def _identity(self) -> dict:
        h, w, c = self.source.shape
        return {"layout": LAYOUT, "dataset": self.dataset, "folder": self.folder, "images": self.source.n,
                "rows_per_severity": self.rows, "height": h, "width": w, "channels": c, "seed": SEED,
                "impulse_noise": "seeded per image",  # caches from before were not reproducible: rebuilt
                "order": "torch.randperm(images, generator seeded 0), as DataBundle.loader draws n_examples"}

    def meta(self) -> dict:
        path = self.root / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def filled(self, name: str) -> int:
        return int(self.meta().get("filled", {}).get(name, 0))

    def _write_meta(self, meta: dict) -> None:
        from ..results import write_json_atomic

        write_json_atomic(self.root / "meta.json", meta)

    def _start(self) -> dict:
        """Create the folder (index, labels, meta) or check the existing one; return its meta."""
        meta = self.meta()
        ident = self._identity()
        if meta and {k: meta.get(k) for k in ident} == ident:
            return meta
        if meta:
            log.warning("corruption cache %s was written for %s; rebuilding it", self.root,
                        {k: meta.get(k) for k in ident if meta.get(k) != ident[k]})
            for p in [*self.dir.glob("*.npy"), self.root / "clean.npy", self.root / "index.npy"]:
                p.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        n = self.source.n
        index = fixed_order(n).numpy().astype(np.int64)
        _save_npy_atomic(self.root / "index.npy", index)
        labels = self.source.labels()[index]
        dtype = np.uint8 if self.source.num_classes <= 256 else np.int64
        tiled = np.zeros(5 * self.rows, dtype=dtype)
        for s in range(5):
            tiled[s * self.rows: s * self.rows + n] = labels
        _save_npy_atomic(self.dir / "labels.npy", tiled)
        meta = {**ident, "imagecorruptions": _ic_version(), "filled": {}}
        self._write_meta(meta)
        return meta

    def _open_for_rows(self, path: Path, blocks: int, rows: int) -> tuple[Path, bool]:
        """The file to write rows into: the existing file, or a new sparse temporary one."""
        if path.is_file():
            return path, False
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        h, w, c = self.source.shape
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(blocks * rows, h, w, c))
        del arr
        return tmp, True

    def digest(self, name: str, filled: int) -> str:
        """sha256 of the first ``filled`` rows of ``clean`` or of a corruption's file (every severity)."""
        path = self.root / "clean.npy" if name == "clean" else self.dir / f"{name}.npy"
        arr = _load_npy(path, "r")
        h = hashlib.sha256()
        for block in range(1 if name == "clean" else 5):
            for a in range(block * self.rows, block * self.rows + filled, 4096):
                h.update(np.ascontiguousarray(arr[a: min(a + 4096, block * self.rows + filled)]).data)
        del arr
        return h.hexdigest()

    def verify(self, names: Sequence[str], setting: str = "evaluate.corruptions") -> dict[str, str]:
        """Check ``clean`` and each named file against the sha256 meta.json recorded when its rows were
        written; return the digests. A mismatch (the file changed since) is a UsageError naming the file
        and the evaluator's ``regenerate`` under ``setting``."""
        meta = self.meta()
        out = {}
        for name in ["clean", *names]:
            filled = int(meta["filled"][name])
            digest = self.digest(name, filled)
            recorded = meta.get("sha256", {}).get(name)
            if recorded is not None and recorded != digest:
                path = self.root / "clean.npy" if name == "clean" else self.dir / f"{name}.npy"
                raise UsageError(f"{path}: its first {filled} rows no longer match the sha256 that {self.root}/"
                                 f"meta.json recorded when they were written (the file was changed); rebuild it "
                                 f"with --set {setting}.regenerate=true")
            out[name] = digest
        if any(name not in meta.get("sha256", {}) for name in out):  # a cache from before hashes: record them
            with _locked(self.root / ".lock"):
                meta = self.meta()
                meta["sha256"] = {**meta.get("sha256", {}), **out}
                self._write_meta(meta)
        return out

    def ensure(self, names: Sequence[str], n: int, workers: int | None = None, quiet: bool | None = True,
               regenerate: bool = False) -> None:
        """Make sure the first ``n`` rows of ``clean.npy`` and of each named corruption (all 5 severities) exist;
        with ``regenerate``, delete those files first and write them again."""
        from ..adapters import imagecorruptions as ic

        n = min(n, self.source.n)
        self.generated, self.seconds = {}, 0.0
        self._maps.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / ".lock"):
            meta = self._start()
            if regenerate:
                for name in ["clean", *names]:
                    (self.root / "clean.npy" if name == "clean" else self.dir / f"{name}.npy").unlink(missing_ok=True)
                    meta["filled"].pop(name, None)
                    meta.get("sha256", {}).pop(name, None)
                self._write_meta(meta)
            for stale in [*self.root.glob(".*.tmp*"), *self.dir.glob(".*.tmp*")]:
                stale.unlink(missing_ok=True)
            filled = dict(meta["filled"])
            index = _load_npy(self.root / "index.npy")
            # clean images, in the parent (for an ImageFolder this decodes the images)
            start = filled.get("clean", 0)
            if start < n:
                path, fresh = self._open_for_rows(self.root / "clean.npy", 1, self.source.n)
                arr = _load_npy(path, "r+")
                for a in range(start, n, 1024):
                    b = min(n, a + 1024)
                    arr[a:b] = self.source.images(index[a:b])
                arr.flush()
                del arr
                if fresh:
                    os.replace(path, self.root / "clean.npy")
                filled["clean"] = n
                meta["filled"] = filled
                meta.setdefault("sha256", {})["clean"] = self.digest("clean", n)
                self._write_meta(meta)
                self.generated["clean"] = (start, n)
            todo = [(c, filled.get(c, 0)) for c in names if filled.get(c, 0) < n]
            if not todo:
                return
            ic.install()
            t0 = time.perf_counter()
            targets, tasks = {}, []
            workers = workers or _cpu_count()
            chunk = max(8, min(64, math.ceil(n / (4 * workers))))
            for c, start in todo:
                path, fresh = self._open_for_rows(self.dir / f"{c}.npy", 5, self.rows)
                targets[c] = (path, fresh)
                for s in range(1, 6):
                    for a in range(start, n, chunk):
                        b = min(n, a + chunk)
                        tasks.append((str(self.root / "clean.npy"), str(path), a, b, (s - 1) * self.rows, c, s,
                                      index[a:b].tolist(), SEED))
            tasks.sort(key=lambda t: -_COST.get(t[5], 1.0) * (t[3] - t[2]))  # long tasks first
            workers = min(workers, len(tasks))
            bar = tqdm(total=sum(t[3] - t[2] for t in tasks), desc="generating corruptions", unit="img",
                       leave=False, disable=quiet)
            try:
                ic.run_tasks(tasks, workers, bar.update)
            except BaseException:
                for path, fresh in targets.values():
                    if fresh:
                        path.unlink(missing_ok=True)
                raise
            finally:
                bar.close()
            for c, (path, fresh) in targets.items():
                if fresh:
                    os.replace(path, self.dir / f"{c}.npy")
                filled[c] = n
                self.generated[c] = (dict(todo)[c], n)
                meta.setdefault("sha256", {})[c] = self.digest(c, n)
            meta["filled"] = filled
            self._write_meta(meta)
            self.seconds = time.perf_counter() - t0
            log.info("generated %d corruption(s) x 5 severities on %d image(s) in %.1fs with %d worker(s) into %s",
                     len(todo), n, self.seconds, workers, self.dir)

    # -- reading
    def _map(self, name: str) -> np.ndarray:
        if name not in self._maps:
            path = self.root / "clean.npy" if name == "clean" else self.dir / f"{name}.npy"
            self._maps[name] = _load_npy(path, "r")
        return self._maps[name]

    def labels(self, n: int) -> np.ndarray:
        if self._labels is None:
            self._labels = _load_npy(self.dir / "labels.npy")
        return self._labels[:n].astype(np.int64)

    def clean(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self._map("clean")[:n], self.labels(n)

    def get(self, name: str, severity: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        a = (severity - 1) * self.rows
        return self._map(name)[a: a + n], self.labels(n)


# rough relative cost per image, to start the slow tasks first
_COST = {"glass_blur": 12.0, "frost": 7.0, "zoom_blur": 2.0, "brightness": 1.0}


def _ic_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagecorruptions")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- evaluation


class _Batches:
    """(x, y) batches on the run's device from uint8 (N, H, W, 3) arrays or float (N, C, H, W) tensors.

    Moves up to 256 MB at a time to the device as stored (uint8: a quarter of
    the bytes), converts there, and resizes to ``data.image_size`` when needed.
    """

    def __init__(self, run, images, labels, batch_size: int):
        self.run, self.images, self.bs = run, images, batch_size
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.n = len(self.labels)
        row = images[0].nbytes if isinstance(images, np.ndarray) else images[0].numel() * images.element_size()
        self.chunk = max(1, CHUNK_BYTES // max(1, row * batch_size)) * batch_size

    def __len__(self) -> int:
        return math.ceil(self.n / self.bs)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        run = self.run
        if x.dtype == torch.uint8:  # (B, H, W, C) -> float (B, C, H, W) in [0, 1]
            fmt = torch.channels_last if run.channels_last else torch.contiguous_format
            x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=fmt).div_(255)
        size = run.data.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
        return run.to_device(x)

    def _chunk(self, a: int, b: int) -> torch.Tensor:
        imgs = self.images[a:b]
        x = torch.from_numpy(np.array(imgs)) if isinstance(imgs, np.ndarray) else imgs  # a copy: maps are read-only
        if self.run.device.type == "cuda":
            x = x.pin_memory().to(self.run.device, non_blocking=True)
        return x

    def first(self) -> torch.Tensor:
        return self._convert(self._chunk(0, min(self.bs, self.n)).to(self.run.device))

    def __iter__(self):
        labels = self.labels.to(self.run.device)
        for a in range(0, self.n, self.chunk):
            b = min(self.n, a + self.chunk)
            x = self._chunk(a, b)
            for i in range(0, b - a, self.bs):
                yield self._convert(x[i: i + self.bs]), labels[a + i: a + i + self.bs]


def _accuracy(run, ctx, report, key: str, domain: str, images, labels, batch_size: int, desc: str,
              adapt) -> float:
    """Accuracy on ``images`` inside ``run.domain`` into ``report[key]``, ``adapt = (images, positions)`` its
    adaptation samples."""
    samples = _Batches(run, adapt[0], np.zeros(len(adapt[0])), len(adapt[0])).first()
    with run.domain(domain, samples, ctx, adapt[1]):
        scores = evaluate_accuracy(run, _Batches(run, images, labels, batch_size), desc=desc, ctx=ctx)
    return report.accuracy(key, scores.correct, scores.labels)


class _Generated:
    def __init__(self, run, cfg: CorruptionsConfig):
        data = run.data
        key, folder = cache_key(data, run.config.data)
        root = Path(cfg.cache_dir or _default_cache()).expanduser() / key
        self.cache = CorruptionCache(root, folder, _SplitImages(data), dataset=key)
        self.n = examples(run, cfg, self.cache.source.n)
        # rows are in the fixed order: the first adapt_samples rows are every domain's adaptation samples
        self.k = min(run.config.adapt_samples, self.cache.source.n if run.adapts else self.n)
        self.cache.ensure(cfg.corruptions, max(self.n, self.k), cfg.workers, quiet=run.quiet,
                          regenerate=cfg.regenerate)
        self.positions = torch.from_numpy(_load_npy(self.cache.root / "index.npy")[: self.k])
        meta = self.cache.meta()
        self.provenance = {"cache": str(self.cache.root), "imagecorruptions": meta.get("imagecorruptions"),
                           "sha256": self.cache.verify(cfg.corruptions, cfg.key)}

    def clean(self):
        """(images, labels) evaluated, and (images, positions) to adapt on, of the clean domain."""
        return *self.cache.clean(self.n), (self.cache.clean(self.k)[0], self.positions)

    def get(self, name: str, severity: int):
        return *self.cache.get(name, severity, self.n), (self.cache.get(name, severity, self.k)[0], self.positions)


def released_rows(run, n: int, total: int, ordered: bool) -> tuple[torch.Tensor, int]:
    """(adaptation rows, rows to read per domain) of a released corruption set whose first ``n`` rows
    are evaluated, of ``total`` rows per severity.

    ``ordered``: the rows are already a fixed random draw (robustbench's ImageNet list), so the
    adaptation rows are its first ``adapt_samples``; otherwise (a CIFAR file holds the test set in
    order) they are the first ``adapt_samples`` of the fixed order over all ``total`` rows. Without a
    plugin that adapts, only evaluated rows are read.
    """
    k = min(run.config.adapt_samples, total)
    rows = torch.arange(k) if ordered else fixed_order(total)[:k]
    if not run.adapts:
        rows = rows[rows < n]
    return rows, max(n, int(rows.max()) + 1 if len(rows) else 0)


#: the released sets robustbench loads, by the run's data name
_RB_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C", "imagefolder": "ImageNet-C"}


def _refuse_unreleased(name: str, where: str) -> None:
    if name not in _RB_FOLDERS:
        raise UsageError(f"{where}: robustbench has no corruption set for data {name!r} "
                         f"(it has CIFAR-10-C, CIFAR-100-C, ImageNet-C); use source: generate")


class _Robustbench:
    """The released corruption sets through robustbench's loaders (no download)."""

    def __init__(self, run, cfg: CorruptionsConfig):  # check() found the files before training
        from ..adapters.robustbench import import_robustbench

        name = run.data.name
        self.data_dir = _released_root(cfg)
        self.rb = import_robustbench()
        self.name, self.run, self.key = name, run, cfg.key
        cap = 5000 if name == "imagefolder" else 10_000  # load_imagenetc refuses more than 5,000
        self.n = min(cfg.n_examples or cap, cap, len(run.data.test))
        if cfg.n_examples and cfg.n_examples > self.n:
            log.info("corruptions: robustbench's %s loader reads at most %d images; using %d",
                     _RB_FOLDERS[name], cap, self.n)
        self.adapt_rows, self.rows = released_rows(run, self.n, min(cap, len(run.data.test)), name == "imagefolder")
        self.index = self._imagenet_index(self.rows) if name == "imagefolder" else list(range(self.n))
        self._clean_labels: torch.Tensor | None = None

    def _imagenet_index(self, n: int) -> list[int]:
        """Test-set positions of the first n of robustbench's 5,000 ImageNet images (the ones load_imagenetc reads).

        robustbench's ImageNet-C loader ignores the folder's listing and reads
        the images named in its ``helper_files/imagenet_test_image_ids.txt``
        (``WNID/ILSVRC2012_val_*.JPEG``, a fixed random draw), in that order.
        """
        ids_file = Path(self.rb.__file__).parent / "helper_files" / "imagenet_test_image_ids.txt"
        ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()][:n]
        test = self.run.data.test
        where = {os.path.relpath(path, test.root).replace(os.sep, "/"): i for i, (path, _) in enumerate(test.samples)}
        missing = [i for i in ids if i not in where]
        if missing:
            raise UsageError(f"{self.run.source}: data.root: ImageNet-C through robustbench uses robustbench's "
                             f"5,000 ImageNet validation images; {test.root} lacks {len(missing)} of the first "
                             f"{len(ids)}, e.g. {missing[0]}")
        return [where[i] for i in ids]

    def _adapt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adaptation rows of ``x`` (``rows`` rows of one domain) and their test-split positions."""
        imagenet = self.name == "imagefolder"
        return x[self.adapt_rows], torch.as_tensor(self.index)[self.adapt_rows] if imagenet else self.adapt_rows

    def clean(self):
        """The same images uncorrupted: the first test images (CIFAR), robustbench's ImageNet ids (ImageNet)."""
        positions = self.index[: self.rows] if self.name == "imagefolder" else range(self.rows)
        xs, ys = zip(*(self.run.data.test[i] for i in positions))
        x = torch.stack(xs)
        self._clean_labels = torch.as_tensor(ys, dtype=torch.long)
        return x[: self.n], self._clean_labels[: self.n], self._adapt(x)

    def get(self, name: str, severity: int):
        loader = {"cifar10": self.rb.data.load_cifar10c, "cifar100": self.rb.data.load_cifar100c,
                  "imagefolder": self.rb.data.load_imagenetc}[self.name]
        x, y = loader(self.rows, severity, str(self.data_dir), shuffle=False, corruptions=[name])
        y = y.long()
        if self._clean_labels is not None and not torch.equal(y, self._clean_labels[: len(y)]):
            raise UsageError(f"{self.run.source}: {self.key}: the labels of {name} severity {severity} "
                             f"under {self.data_dir} do not match the run's test split: not the same dataset?")
        return x[: self.n], y[: self.n], self._adapt(x)


def corruptions(model, ctx, report, cfg: CorruptionsConfig) -> None:
    run = ctx.run
    sets = _Robustbench(run, cfg) if cfg.source == "robustbench" else _Generated(run, cfg)
    if getattr(sets, "provenance", None):
        report.records["corruptions/provenance"] = sets.provenance
    images, labels, adapt = sets.clean()
    clean_acc = _accuracy(run, ctx, report, "corruptions/clean_acc", "clean", images, labels, cfg.batch_size,
                          "corruptions: clean", adapt)
    acc: dict[tuple[str, int], float] = {}
    bar = tqdm(total=len(cfg.corruptions) * len(cfg.severities), desc="corruptions", disable=run.quiet)
    for name in cfg.corruptions:
        for s in cfg.severities:
            images, labels, adapt = sets.get(name, s)
            acc[name, s] = _accuracy(run, ctx, report, f"corruptions/{name}/{s}/acc", f"corruptions/{name}/{s}",
                                     images, labels, cfg.batch_size, f"{name} {s}", adapt)
            bar.update()
            bar.set_postfix(acc=f"{acc[name, s]:.3f}")
    bar.close()
    for name in cfg.corruptions:
        report.mean_accuracy(f"corruptions/{name}/acc", [f"corruptions/{name}/{s}/acc" for s in cfg.severities])
    # the mean over corruptions of the means over severities: every set counts the same
    mean = report.mean_accuracy("corruptions/acc", [f"corruptions/{name}/acc" for name in cfg.corruptions])
    report.add("corruptions/error", 1.0 - mean)
    report.add("corruptions/drop", clean_acc - mean)
    if clean_acc > 0:
        report.add("corruptions/relative_drop", (clean_acc - mean) / clean_acc)
    if cfg.source == "robustbench" and run.data.name == "imagefolder":
        if sorted(cfg.severities) == [1, 2, 3, 4, 5]:
            ces = {c: mce_term([1 - acc[c, s] for s in cfg.severities], c) for c in cfg.corruptions}
            for c, ce in ces.items():
                report.add(f"corruptions/{c}/ce", ce)
            if set(ces) == set(COMMON):
                report.add("corruptions/mce", float(np.mean(list(ces.values()))))
        else:
            log.info("corruptions: no CE/mCE (the AlexNet constants average all five severities)")
    if cfg.plot and run.dir is not None:
        path = heatmap(acc, cfg.corruptions, cfg.severities, Path(run.dir) / "plots" / "corruptions.png",
                       clean_acc=clean_acc)
        report.plots["corruptions"] = str(path)


def mce_term(errors: Sequence[float], name: str) -> float:
    """CE of one corruption: sum of the model's errors over the five severities / sum of AlexNet's."""
    return float(sum(errors) / (len(errors) * ALEXNET_ERR[name]))


def heatmap(acc: dict[tuple[str, int], float], names: Sequence[str], severities: Sequence[int], path: Path,
            clean_acc: float | None = None, title: str = "top-1 accuracy (%) under corruption") -> Path:
    """A PNG of accuracy by corruption (rows) and severity (columns), with the per-corruption mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sev = list(severities)
    grid = np.array([[acc[c, s] for s in sev] + [np.mean([acc[c, s] for s in sev])] for c in names])
    fig, ax = plt.subplots(figsize=(1.0 * len(sev) + 3.6, 0.36 * len(names) + 1.4))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(sev) + 1), [str(s) for s in sev] + ["mean"])
    ax.set_yticks(range(len(names)), [c.replace("_", " ") for c in names])
    ax.set_xlabel("severity")
    ax.axvline(len(sev) - 0.5, color="white", lw=2)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if grid[i, j] > 0.6 else "white")
    mean = float(np.mean([acc[c, s] for c in names for s in sev]))
    sub = f"mean {100 * mean:.1f}%" + (f", clean {100 * clean_acc:.1f}%" if clean_acc is not None else "")
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="top-1 accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _released_root(cfg: CorruptionsConfig) -> Path:
    from ..data import _default_root

    return Path(cfg.data_dir).expanduser() if cfg.data_dir else _default_root()


def check(run, cfg: CorruptionsConfig) -> None:
    """Before training. Source robustbench: the released set exists for the run's data (CIFAR-10, CIFAR-100,
    ImageNet) and its files are in place. Source generate: the cache can be written (it is created and
    locked there even when everything is cached)."""
    name, where = run.config.data.name, f"{run.source}: {cfg.key}.source"
    if cfg.source == "generate":
        root = Path(cfg.cache_dir or _default_cache()).expanduser()
        there = unwritable_folder(root)
        if there is not None:
            raise UsageError(f"{run.source}: {cfg.key}.cache_dir: the generated sets are written and "
                             f"locked under {root}, but {there} is not a writable directory; set cache_dir (or "
                             f"NORMLAB_DATA) to one that is")
        return
    _refuse_unreleased(name, where)
    bad = [c for c in cfg.corruptions if c not in COMMON]
    if bad:
        raise UsageError(f"{where}: the released sets hold only the 15 common corruptions, not {bad}")
    folder = _released_root(cfg) / _RB_FOLDERS[name]
    if name == "imagefolder":
        missing = [f"{c}/{s}" for c in cfg.corruptions for s in cfg.severities if not (folder / c / str(s)).is_dir()]
    else:
        missing = [f"{c}.npy" for c in ["labels", *cfg.corruptions] if not (folder / f"{c}.npy").is_file()]
    if missing:
        raise UsageError(
            f"{where}: 'robustbench' reads the released {_RB_FOLDERS[name]} from {folder}, which lacks "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; place the data there (set "
            f"{cfg.key}.data_dir or NORMLAB_DATA; normlab does not download it) or use source: generate")


EVALUATORS = [Evaluator("corruptions", corruptions,
                        "accuracy under the 15 ImageNet-C corruptions x 5 severities (generated once and cached, "
                        "or robustbench's released sets); mean error, drop from clean, mCE for ImageNet-C",
                        check=check)]
