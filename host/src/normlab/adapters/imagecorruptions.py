"""Adapter: imagecorruptions 1.1.2 under NumPy 2 and current scikit-image (0.26 here).

imagecorruptions is the pip-installable port of the ImageNet-C corruptions
(Hendrycks and Dietterich, ICLR 2019). As installed here, two of its 15
'common' corruptions fail:

- ``glass_blur`` (and the validation corruption ``gaussian_blur``) call
  ``skimage.filters.gaussian(..., multichannel=True)``. scikit-image 0.19
  deprecated ``multichannel`` for ``channel_axis`` and later releases removed it:
  ``TypeError: gaussian() got an unexpected keyword argument 'multichannel'``.
  ``multichannel=True`` meant "the last axis holds channels; blur each channel
  on its own", which is ``channel_axis=-1``.
- ``fog`` calls ``plasma_fractal``, which allocates its height map with
  ``dtype=np.float_``. NumPy 2 removed that alias of ``np.float64``:
  ``AttributeError: `np.float_` was removed in the NumPy 2.0 release``.

A third problem is silent: ``impulse_noise`` calls ``skimage.util.random_noise``
without a generator, and current scikit-image then draws from a fresh, unseeded
``default_rng()``, so seeding NumPy does not make it reproducible (two
generations of the same cache differed: base model accuracy 0.9426 against
0.9358 on impulse noise).

:func:`install` changes three names inside the module
``imagecorruptions.corruptions`` and nothing else (not numpy, not skimage):

1. ``gaussian``, the name ``glass_blur`` and ``gaussian_blur`` look up, becomes
   :func:`gaussian_channel_axis`, which maps ``multichannel=True`` to
   ``channel_axis=-1`` and calls scikit-image's ``gaussian``.
2. ``plasma_fractal``, the name ``fog`` looks up, becomes the same code object
   (imagecorruptions' own function) bound to a copy of the module's globals
   in which ``np`` is numpy plus ``float_ = float64``.
3. ``sk`` (scikit-image as the module uses it) becomes a view of scikit-image
   whose ``util.random_noise`` is :func:`seeded_random_noise`, which passes a
   generator seed drawn from NumPy's global state (seeded per image below).

Every corruption, including ``glass_blur`` and ``fog`` themselves, runs its own
code; ``imagecorruptions.corrupt`` works for all 19 names afterwards. The two
changes are skipped where they are not needed (an old numpy or scikit-image).

Images smaller than 32 pixels on a side (imagecorruptions refuses them) are
first enlarged with bilinear interpolation so that the shorter side is 32
(:func:`at_least_32`); the result keeps that size.

The corruptions draw from NumPy's global random state. :func:`corrupt_images`
seeds it per image from (seed, corruption, severity, image id), so an image's
corrupted version does not depend on which worker made it or on how many
images were made with it, and restores the caller's random state afterwards.
"""

from __future__ import annotations

import os
import types
import warnings
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["MIN_SIZE", "CorruptionsUnavailable", "install", "corruption_names", "at_least_32", "corrupt",
           "corrupt_images", "image_seed", "gaussian_channel_axis", "corrupt_npy_rows", "run_tasks", "worker_init"]

MIN_SIZE = 32


class CorruptionsUnavailable(ImportError):
    """imagecorruptions (or what it imports) is missing; the message says what to install."""


_installed = False


def gaussian_channel_axis(image, sigma=1, *args, multichannel=None, **kwargs):
    """scikit-image's ``gaussian`` accepting the removed ``multichannel`` keyword (True -> ``channel_axis=-1``)."""
    from skimage.filters import gaussian

    if multichannel is not None and "channel_axis" not in kwargs:
        kwargs["channel_axis"] = -1 if multichannel else None
    return gaussian(image, sigma, *args, **kwargs)


class _NumpyWithFloat_(types.ModuleType):
    """numpy as seen by ``plasma_fractal``: every attribute of numpy, plus ``float_`` (= ``float64``)."""

    float_ = np.float64

    def __getattr__(self, name):
        return getattr(np, name)


def seeded_random_noise(image, mode="gaussian", rng=None, clip=True, **kwargs):
    """scikit-image's ``random_noise`` drawing its generator's seed from NumPy's global random state.

    ``impulse_noise`` calls ``random_noise`` without ``rng``, and scikit-image then uses a fresh,
    unseeded ``default_rng()``: every generation of the cache gave different impulse noise. Here
    the seed comes from the global state that :func:`corrupt_images` seeds per image.
    """
    from skimage.util import random_noise

    if rng is None:
        rng = int(np.random.randint(0, 2**31 - 1))
    return random_noise(image, mode=mode, rng=rng, clip=clip, **kwargs)


class _SkimageSeeded:
    """``skimage`` as imagecorruptions uses it, with ``util.random_noise`` seeded from NumPy's global state."""

    def __init__(self, skimage):
        self._skimage = skimage
        self.util = types.SimpleNamespace(random_noise=seeded_random_noise)

    def __getattr__(self, name):
        return getattr(self._skimage, name)


def _with_names(fn: types.FunctionType, **names) -> types.FunctionType:
    """A copy of ``fn`` whose global names ``names`` are replaced (the module itself is left alone)."""
    namespace = {**fn.__globals__, **names}
    adapted = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    adapted.__doc__, adapted.__wrapped__ = fn.__doc__, fn
    return adapted


def _needs_gaussian_fix() -> bool:
    import inspect

    from skimage.filters import gaussian

    return "multichannel" not in inspect.signature(gaussian).parameters


def install() -> types.ModuleType:
    """Adapt ``imagecorruptions.corruptions`` in place (idempotent) and return the ``imagecorruptions`` package."""
    global _installed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources' deprecation warning at import
            import imagecorruptions
            from imagecorruptions import corruptions as mod
    except ImportError as e:
        raise CorruptionsUnavailable(
            f"imagecorruptions cannot be imported ({type(e).__name__}: {e}); install imagecorruptions==1.1.2, "
            f"opencv-python-headless, scikit-image and setuptools<81 (it uses pkg_resources)") from e
    if _installed:
        return imagecorruptions
    if _needs_gaussian_fix():
        mod.gaussian = gaussian_channel_axis
    if not hasattr(np, "float_"):
        mod.plasma_fractal = _with_names(mod.plasma_fractal, np=_NumpyWithFloat_("numpy"))
    # impulse_noise: scikit-image's unseeded generator made it irreproducible (seeded_random_noise); the
    # module reads `sk` at call time, so `sk.util.random_noise` is replaced for it and `sk.color` kept
    if not isinstance(mod.sk, _SkimageSeeded):
        mod.sk = _SkimageSeeded(mod.sk)
    _installed = True
    return imagecorruptions


def corruption_names(subset: str = "common") -> list[str]:
    """imagecorruptions' names, in its order (``common``: the 15 of ImageNet-C)."""
    return list(install().get_corruption_names(subset))


def at_least_32(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) uint8, enlarged (bilinear) so that its shorter side is at least 32 pixels."""
    h, w = image.shape[:2]
    if min(h, w) >= MIN_SIZE:
        return image
    from PIL import Image

    scale = MIN_SIZE / min(h, w)
    size = (max(MIN_SIZE, round(w * scale)), max(MIN_SIZE, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def corrupt(image: np.ndarray, name: str, severity: int) -> np.ndarray:
    """One corruption of one uint8 (H, W, 3) image at ``severity`` 1..5, through ``imagecorruptions.corrupt``."""
    ic = install()
    out = ic.corrupt(at_least_32(image), severity=severity, corruption_name=name)
    return np.asarray(out, dtype=np.uint8)


def image_seed(seed: int, name: str, severity: int, image_id: int) -> list[int]:
    """The NumPy seed sequence of one (corruption, severity, image)."""
    return [seed & 0xFFFFFFFF, zlib.crc32(name.encode()), severity, image_id & 0xFFFFFFFF]


def corrupt_images(images: np.ndarray, name: str, severity: int, ids: Sequence[int], seed: int = 0,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Corrupt uint8 (N, H, W, 3) images, each seeded from ``(seed, name, severity, ids[i])``.

    Writes into ``out`` when given (same N, the output size); the caller's NumPy
    random state is unchanged afterwards.
    """
    state = np.random.get_state()
    try:
        for i, image in enumerate(images):
            np.random.seed(image_seed(seed, name, severity, int(ids[i])))
            result = corrupt(np.ascontiguousarray(image), name, severity)
            if out is None:
                out = np.empty((len(images),) + result.shape, dtype=np.uint8)
            out[i] = result
    finally:
        np.random.set_state(state)
    return out


def worker_init() -> None:
    """Initializer of a generating process: one OpenCV thread (the processes are the parallelism), adapter on."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    install()


def corrupt_npy_rows(task: tuple) -> int:
    """Corrupt rows ``start:stop`` of the .npy ``src`` into rows ``offset+start:offset+stop`` of the .npy ``dst``.

    ``task`` is ``(src, dst, start, stop, offset, name, severity, ids, seed)``;
    ``ids`` are the images' ids for seeding. Both files are opened memory-mapped,
    so processes writing disjoint rows of one file need no coordination.
    Returns the number of images written.
    """
    src, dst, start, stop, offset, name, severity, ids, seed = task
    images = np.load(src, mmap_mode="r")[start:stop]
    out = np.load(dst, mmap_mode="r+")
    corrupt_images(images, name, severity, ids, seed, out=out[offset + start: offset + stop])
    out.flush()
    del out
    return stop - start


def run_tasks(tasks: Sequence[tuple], workers: int, progress=None) -> None:
    """Run :func:`corrupt_npy_rows` over ``tasks``; ``progress(k)`` after each task with its image count.

    With ``workers`` > 1 the tasks run in a helper interpreter
    (``python -m normlab.adapters.imagecorruptions``) that forks its pool. The
    helper starts clean, so its pool never inherits the caller's threads or CUDA
    state (what makes forking a trained-model process risky), and nothing
    re-imports the caller's ``__main__`` (what the spawn method does, which breaks
    unguarded scripts).
    """
    progress = progress or (lambda k: None)
    if workers <= 1:
        for t in tasks:
            progress(corrupt_npy_rows(t))
        return
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])  # the folder holding the normlab package
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        try:
            proc.stdin.write(json.dumps({"workers": workers, "tasks": [list(t) for t in tasks]}))
            proc.stdin.close()
            for line in proc.stdout:
                progress(int(line))
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            err.seek(0)
            tail = err.read()[-2000:]
            raise RuntimeError(f"generating corruptions failed in the worker processes (exit status {rc}):\n{tail}")


def _main() -> None:
    """Entry of the helper interpreter: read {workers, tasks} as JSON on stdin, print each task's image count."""
    import importlib
    import json
    import multiprocessing as mp
    import sys

    # this module under its package name (not __main__), so the pool pickles its functions by that name
    me = importlib.import_module("normlab.adapters.imagecorruptions")

    spec = json.load(sys.stdin)
    me.worker_init()  # import and adapt once; the forked workers inherit it
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(spec["workers"], initializer=me.worker_init) as pool:
        for done in pool.imap_unordered(me.corrupt_npy_rows, [tuple(t) for t in spec["tasks"]]):
            print(done, flush=True)


if __name__ == "__main__":
    _main()
