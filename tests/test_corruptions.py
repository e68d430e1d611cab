"""The corruptions evaluator: the imagecorruptions adapter, the on-disk cache, robustbench reading it, the numbers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import normlab
from normlab.adapters import imagecorruptions as ic
from normlab.config import parse_run
from normlab.context import Context
from normlab.errors import UsageError
from normlab.evals import EVALUATORS, Report
from normlab.evals import corruptions as C
from normlab.runner import prepare
from plugins_for_tests import Recorder

FEW = ["fog", "gaussian_noise", "contrast"]


def built_run(settings=None, data=None):
    """A Run from prepare() + build() (untrained resnet18 on the embedded MNIST) with the evaluator's settings."""
    cfg = parse_run({"seed": 0, "model": {"name": "resnet18"}, "data": data or {"name": "mnist"},
                     "evaluate": {"corruptions": settings or {}}}, "test.yaml")
    r = prepare(cfg, "test.yaml", quiet=True)
    r.build()
    r.model.eval()
    return r


def evaluate(r, settings=None):
    cfg = C.CorruptionsConfig(**settings) if settings is not None else r.evaluators["corruptions"]
    report = Report()
    EVALUATORS["corruptions"].fn(r.model, Context(run=r), report, cfg)
    return report.metrics


def mnist_images(n):
    from normlab.data import embedded_mnist

    _, test = embedded_mnist()
    return test.images[:n].permute(0, 2, 3, 1).numpy().copy()


@pytest.fixture(scope="module")
def mnist_run():
    return built_run()


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, mnist_run):
    """fog, gaussian_noise and contrast on the first 40 rows of the embedded test split, in one process."""
    cache = tmp_path_factory.mktemp("cache")
    metrics = evaluate(mnist_run, {"n_examples": 40, "corruptions": FEW, "workers": 1, "cache_dir": str(cache),
                                   "batch_size": 16, "severities": [1]})  # all 5 are generated
    return cache / "mnist-test", metrics


# --------------------------------------------------------------------------- the adapter


def test_names_and_constants_follow_imagecorruptions_and_reference():
    assert list(C.COMMON) == ic.corruption_names("common")
    assert list(C.VALIDATION) == ic.corruption_names("validation")
    assert C.ALEXNET_ERR["gaussian_noise"] == 0.886428 and C.ALEXNET_ERR["jpeg_compression"] == 0.6065
    assert C.ALEXNET_ERR["brightness"] == 0.564592 and len(C.ALEXNET_ERR) == 15


def test_gaussian_adapter_blurs_each_channel_on_its_own():
    from skimage.filters import gaussian

    x = np.random.default_rng(0).random((20, 24, 3))
    ours = ic.gaussian_channel_axis(x, sigma=1.3, multichannel=True)
    reference = np.stack([gaussian(x[..., k], sigma=1.3) for k in range(3)], axis=-1)
    np.testing.assert_allclose(ours, reference, atol=1e-12)
    assert not np.allclose(ours, gaussian(x, sigma=1.3))  # blurring across channels would differ


def test_adapted_fog_and_glass_blur_equal_the_original_code_with_the_old_apis(monkeypatch):
    from PIL import Image
    from skimage.filters import gaussian

    ic.install()
    from imagecorruptions import corruptions as mod

    img = Image.fromarray(mnist_images(3)[2])
    adapted = {}
    for name in ("fog", "glass_blur"):
        for s in (1, 4):
            np.random.seed(7)
            adapted[name, s] = getattr(mod, name)(img, s)
    # the original functions under the APIs they were written for: np.float_ and a multichannel gaussian
    monkeypatch.setattr(np, "float_", np.float64, raising=False)
    monkeypatch.setattr(mod, "plasma_fractal", mod.plasma_fractal.__wrapped__)
    monkeypatch.setattr(mod, "gaussian", lambda x, sigma, multichannel: np.stack(
        [gaussian(x[..., k], sigma=sigma) for k in range(x.shape[-1])], axis=-1))
    for (name, s), ours in adapted.items():
        np.random.seed(7)
        np.testing.assert_array_equal(ours, getattr(mod, name)(img, s), err_msg=f"{name} {s}")


def test_small_images_are_brought_to_32_pixels():
    img = np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    big = ic.at_least_32(img)
    assert big.shape == (32, 38, 3) and big.dtype == np.uint8
    out = ic.corrupt(img, "fog", 2)
    assert out.shape == (32, 38, 3) and out.dtype == np.uint8


def test_seeding_is_per_image_and_leaves_the_global_state_alone():
    imgs = mnist_images(6)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = ic.corrupt_images(imgs, "gaussian_noise", 3, ids=range(6))
    assert np.array_equal(np.random.get_state()[1], before)
    b = ic.corrupt_images(imgs[3:], "gaussian_noise", 3, ids=range(3, 6))
    np.testing.assert_array_equal(a[3:], b)  # an image's result does not depend on its batch
    c = ic.corrupt_images(imgs, "gaussian_noise", 3, ids=range(6), seed=1)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", C.COMMON)
def test_every_corruption_repeats_exactly_from_its_seed(name):
    """impulse_noise drew from scikit-image's own unseeded generator: the adapter seeds it (issue 17 rerun)."""
    imgs = mnist_images(2)
    a = ic.corrupt_images(imgs, name, 4, ids=[3, 8])
    b = ic.corrupt_images(imgs[1:], name, 4, ids=[8])
    np.testing.assert_array_equal(a[1], b[0])
    assert not np.array_equal(a, imgs) or name == "brightness"  # it changed the images


# --------------------------------------------------------------------------- all 15 x 5, with the worker pool


def test_all_15_corruptions_at_5_severities_through_the_pool(tmp_path, mnist_run):
    n = 8
    metrics = evaluate(mnist_run, {"n_examples": n, "workers": 2, "cache_dir": str(tmp_path), "batch_size": 8})
    cache = tmp_path / "mnist-test"
    clean = np.load(cache / "clean.npy", mmap_mode="r")[:n]
    index = np.load(cache / "index.npy")
    for name in C.COMMON:
        arr = np.load(cache / "CIFAR-10-C" / f"{name}.npy", mmap_mode="r")
        assert arr.dtype == np.uint8 and arr.shape == (50_000, 32, 32, 3)
        for s in range(1, 6):
            block = arr[(s - 1) * 10_000:(s - 1) * 10_000 + n]
            for img, ref in zip(block, clean):
                assert not np.array_equal(img, ref), f"{name} {s} left an image unchanged"
    # the pool's rows are what one process makes for the same images (per-image seeds)
    for name in ("glass_blur", "frost", "fog"):
        arr = np.load(cache / "CIFAR-10-C" / f"{name}.npy", mmap_mode="r")
        for s in (1, 5):
            expected = ic.corrupt_images(np.array(clean), name, s, ids=index[:n])
            np.testing.assert_array_equal(arr[(s - 1) * 10_000:(s - 1) * 10_000 + n], expected)
    per_severity = [k for k in metrics if k.count("/") == 3 and k.endswith("/acc")]
    assert len(per_severity) == 75
    assert set(per_severity) == {f"corruptions/{c}/{s}/acc" for c in C.COMMON for s in range(1, 6)}
    assert {f"corruptions/{c}/acc" for c in C.COMMON} <= set(metrics)
    assert {"corruptions/acc", "corruptions/error", "corruptions/clean_acc", "corruptions/drop",
            "corruptions/relative_drop"} <= set(metrics)
    assert "corruptions/mce" not in metrics  # generated MNIST is not ImageNet-C
    for v in metrics.values():
        assert np.isfinite(v)
    for c in C.COMMON:  # accuracies of 8 images are multiples of 1/8
        for s in range(1, 6):
            assert metrics[f"corruptions/{c}/{s}/acc"] * 8 == round(metrics[f"corruptions/{c}/{s}/acc"] * 8)


# --------------------------------------------------------------------------- the cache


def test_cache_layout_dtypes_and_row_order(small_cache, mnist_run):
    root, _ = small_cache
    meta = json.loads((root / "meta.json").read_text())
    assert meta["filled"] == {"clean": 40, "fog": 40, "gaussian_noise": 40, "contrast": 40}
    assert meta["rows_per_severity"] == 10_000 and meta["images"] == 1000
    index = np.load(root / "index.npy")
    assert index.dtype == np.int64 and sorted(index.tolist()) == list(range(1000))
    # the first n rows are the n_examples subset every evaluator uses
    loader = mnist_run.data.loader("test", 40, n=40)
    assert loader.dataset.indices == index[:40].tolist()
    test = mnist_run.data.test
    clean = np.load(root / "clean.npy")
    assert clean.dtype == np.uint8 and clean.shape == (1000, 32, 32, 3)
    np.testing.assert_array_equal(clean[:40], test.images[index[:40]].permute(0, 2, 3, 1).numpy())
    labels = np.load(root / "CIFAR-10-C" / "labels.npy")
    assert labels.dtype == np.uint8 and labels.shape == (50_000,)
    for s in range(5):
        np.testing.assert_array_equal(labels[s * 10_000:s * 10_000 + 1000], test.labels[index].numpy())
        assert not labels[s * 10_000 + 1000:(s + 1) * 10_000].any()
    fog = np.load(root / "CIFAR-10-C" / "fog.npy", mmap_mode="r")
    assert fog.shape == (50_000, 32, 32, 3) and fog.dtype == np.uint8
    for s in range(5):
        assert fog[s * 10_000:s * 10_000 + 40].any(axis=(1, 2, 3)).all()
        assert not fog[s * 10_000 + 40:s * 10_000 + 50].any()  # rows not generated yet are zero
    assert not list(root.rglob(".*tmp*"))  # nothing left from the atomic writes


def test_robustbench_loader_reads_the_cache_as_the_evaluator_does(small_cache, mnist_run):
    from normlab.adapters.robustbench import import_robustbench

    root, _ = small_cache
    rb = import_robustbench()
    cache = C.CorruptionCache(root, "CIFAR-10-C", C._SplitImages(mnist_run.data), "mnist-test")
    for s in range(1, 6):
        x, y = rb.data.load_cifar10c(40, s, str(root), shuffle=False, corruptions=["fog"])
        batches = C._Batches(mnist_run, *cache.get("fog", s, 40), batch_size=16)
        ours = list(batches)
        assert torch.equal(x, torch.cat([b[0] for b in ours]))
        assert torch.equal(y.long(), torch.cat([b[1] for b in ours]))
    # two corruptions: robustbench takes n/2 of each, with the labels of the first rows
    x, y = rb.data.load_cifar10c(40, 3, str(root), shuffle=False, corruptions=["fog", "contrast"])
    fog, labels = cache.get("fog", 3, 20)
    contrast, _ = cache.get("contrast", 3, 20)
    expected = torch.from_numpy(np.concatenate([fog, contrast])).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x, expected) and torch.equal(y.long(), torch.from_numpy(np.concatenate([labels, labels])))


def blocks(path, n):
    """The first n rows of each severity block of a cached corruption file, as (5, n, H, W, 3)."""
    arr = np.load(path, mmap_mode="r")
    return np.stack([arr[s * 10_000:s * 10_000 + n] for s in range(5)])


def test_a_tampered_cache_is_refused_and_regenerate_rebuilds_it(tmp_path, mnist_run):
    """Issue 14: meta.json holds each file's sha256; a changed file is one UsageError naming it, and
    regenerate: true writes it again (the same images: generation is seeded per image)."""
    import hashlib
    import shutil

    from normlab.errors import UsageError

    settings = {"n_examples": 16, "corruptions": ["fog"], "workers": 1, "cache_dir": str(tmp_path), "batch_size": 16,
                "severities": [1]}
    first = evaluate(mnist_run, settings)
    root = tmp_path / "mnist-test"
    meta = json.loads((root / "meta.json").read_text())
    fog = root / meta["folder"] / "fog.npy"
    arr = np.load(fog, mmap_mode="r")
    rows = meta["rows_per_severity"]  # the released layout: 10,000 rows per severity block
    by_hand = hashlib.sha256(b"".join(np.ascontiguousarray(arr[b * rows: b * rows + 16]).tobytes()
                                      for b in range(5))).hexdigest()
    assert meta["sha256"]["fog"] == by_hand
    del arr
    arr = np.load(fog, mmap_mode="r+")
    arr[3, 5, 5, 0] ^= 0xFF  # one byte of one evaluated image
    arr.flush()
    del arr
    with pytest.raises(UsageError, match=r"fog.npy: its first 16 rows no longer match the sha256 .* "
                                         r"--set evaluate.corruptions.regenerate=true"):
        evaluate(mnist_run, settings)
    again = evaluate(mnist_run, {**settings, "regenerate": True})
    assert again == first
    assert json.loads((root / "meta.json").read_text())["sha256"]["fog"] == by_hand
    fog.write_bytes(b"garbage\n")  # not an array at all (numpy read it as a pickle and refused: exit 1)
    with pytest.raises(UsageError, match=r"fog.npy: not a corruption-cache array \(ValueError: .*regenerate: true"):
        evaluate(mnist_run, settings)
    assert evaluate(mnist_run, {**settings, "regenerate": True}) == first
    shutil.rmtree(tmp_path / "mnist-test")


def test_cache_is_reused_and_extended_not_rebuilt(tmp_path, mnist_run, monkeypatch):
    settings = {"n_examples": 20, "corruptions": ["fog", "contrast"], "workers": 1, "cache_dir": str(tmp_path),
                "severities": [2]}
    first = evaluate(mnist_run, settings)
    fog = tmp_path / "mnist-test" / "CIFAR-10-C" / "fog.npy"
    stamp, rows = fog.stat().st_mtime_ns, blocks(fog, 20)

    def refuse(*a, **k):
        raise AssertionError("regenerated a cached corruption")

    monkeypatch.setattr(ic, "run_tasks", refuse)
    assert evaluate(mnist_run, settings) == first
    assert evaluate(mnist_run, {**settings, "n_examples": 12}) is not None  # fewer rows: still cached
    assert fog.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    # more images: only the missing rows are made, and they are what a fresh cache holds
    seen = []
    real = ic.run_tasks
    monkeypatch.setattr(ic, "run_tasks", lambda tasks, *a: (seen.extend(tasks), real(tasks, *a)))
    evaluate(mnist_run, {**settings, "n_examples": 30, "corruptions": ["fog"]})
    made = {s: sorted(r for t in seen if t[6] == s for r in range(t[2], t[3])) for s in range(1, 6)}
    assert made == {s: list(range(20, 30)) for s in range(1, 6)}
    fresh = tmp_path / "fresh"
    evaluate(mnist_run, {**settings, "n_examples": 30, "corruptions": ["fog"], "cache_dir": str(fresh)})
    extended, new = blocks(fog, 31), blocks(fresh / "mnist-test" / "CIFAR-10-C" / "fog.npy", 31)
    np.testing.assert_array_equal(extended[:, :20], rows)
    np.testing.assert_array_equal(extended, new)
    assert extended[:, :30].any(axis=(2, 3, 4)).all() and not extended[:, 30].any()


# --------------------------------------------------------------------------- the numbers, end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet18 trained one epoch on 512 digits, evaluated with clean and corruptions (50 images), recorded."""
    tmp = tmp_path_factory.mktemp("e2e")
    recorder = Recorder()
    config = {
        "seed": 0, "model": {"name": "resnet18"}, "adapt_samples": 32,
        "data": {"name": "mnist", "batch_size": 64, "n_train": 512},
        "train": {"val_examples": 100, "epochs": 1, "lr": 0.05},
        "plugins": {"recorder": {}},
        "evaluate": {"clean": {"n_examples": 50},
                     "corruptions": {"n_examples": 50, "corruptions": ["gaussian_noise", "contrast", "fog"],
                                     "severities": [1, 3, 5], "workers": 1, "batch_size": 32,
                                     "cache_dir": str(tmp / "cache")}},
    }
    res = normlab.run(config, out=tmp / "run", plugins={"recorder": recorder}, quiet=True)
    return res, recorder, tmp / "cache" / "mnist-test"


def test_accuracies_equal_a_hand_computation_on_the_cached_arrays(trained):
    res, _, root = trained
    m, model = res.metrics, res.model.eval()
    labels = torch.from_numpy(np.load(root / "CIFAR-10-C" / "labels.npy")[:50].astype(np.int64))

    def by_hand(images):
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return (model(x).argmax(1) == labels).sum().item() / len(labels)

    by_sev = {}
    for name in ("gaussian_noise", "contrast", "fog"):
        arr = np.load(root / "CIFAR-10-C" / f"{name}.npy", mmap_mode="r")
        for s in (1, 3, 5):
            by_sev[name, s] = by_hand(arr[(s - 1) * 10_000:(s - 1) * 10_000 + 50])
            assert m[f"corruptions/{name}/{s}/acc"] == pytest.approx(by_sev[name, s], abs=1e-9)
        assert m[f"corruptions/{name}/acc"] == pytest.approx(np.mean([by_sev[name, s] for s in (1, 3, 5)]))
    mean = np.mean(list(by_sev.values()))
    clean = by_hand(np.load(root / "clean.npy", mmap_mode="r")[:50])
    assert m["corruptions/acc"] == pytest.approx(mean)
    assert m["corruptions/error"] == pytest.approx(1 - mean)
    assert m["corruptions/clean_acc"] == pytest.approx(clean)
    assert m["corruptions/clean_acc"] == m["clean/acc"]  # the same 50 images as the clean evaluator
    assert m["corruptions/drop"] == pytest.approx(clean - mean)
    assert m["corruptions/relative_drop"] == pytest.approx((clean - mean) / clean)
    assert m["clean/acc"] > 0.3  # it learned something (chance: 0.1), so the comparison means something
    assert len([k for k in m if k.startswith("corruptions/") and k.count("/") == 3 and k.endswith("/acc")]) == 9


def test_each_domain_is_adapted_once_with_unlabeled_samples_and_restored(trained):
    _, recorder, _ = trained
    calls = [c for c in recorder.calls if isinstance(c, tuple) and c[0] in ("on_domain", "restore")]
    corr = [c for c in calls if c[1].startswith("corruptions/")]
    expected = []
    for name in ("gaussian_noise", "contrast", "fog"):
        for s in (1, 3, 5):
            expected += [("on_domain", f"corruptions/{name}/{s}", 32), ("restore", f"corruptions/{name}/{s}")]
    assert corr == expected
    # the epoch's validation, the clean evaluator and the corruptions evaluator's clean reference
    assert calls.count(("on_domain", "clean", 32)) == 3


def test_heat_map_is_written(trained):
    res, _, _ = trained
    png = res.dir / "plots" / "corruptions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


# --------------------------------------------------------------------------- settings and sources


@pytest.mark.parametrize("settings, message", [
    ({"corruptions": ["fogg"]}, "did you mean 'fog'"),
    ({"severities": [0, 2]}, "severities from 1 to 5"),
    ({"corruptions": ["fog", "fog"]}, "each once"),
    ({"source": "imagenet"}, "source"),
    ({"colour": 1}, "colour"),
    ({"source": "robustbench"}, r"evaluate.corruptions.source: robustbench has no corruption set for data 'mnist'"),
])
def test_bad_settings_are_usage_errors(settings, message):
    cfg = parse_run({"evaluate": {"corruptions": settings}}, "run.yaml")
    with pytest.raises(UsageError, match=message):
        prepare(cfg, "run.yaml")


def test_robustbench_source_without_the_data_is_refused_before_training(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "labels.npy").write_bytes(b"")
    cfg = parse_run({"data": {"name": "cifar10", "root": str(tmp_path)}, "evaluate": {"corruptions": {
        "source": "robustbench", "data_dir": str(tmp_path), "corruptions": ["fog", "snow"]}}}, "run.yaml")
    with pytest.raises(UsageError, match=r"run.yaml: evaluate.corruptions.source: 'robustbench' reads the released "
                                         r"CIFAR-10-C from .*lacks labels.npy, fog.npy, snow.npy; .*normlab does not "
                                         r"download"):
        prepare(cfg, "run.yaml")
    assert not (tmp_path / "CIFAR-10-C").exists()  # robustbench was not asked (it would download)


class _Oracle(torch.nn.Module):
    """Predicts the label of the stored image nearest to its input: accuracy 1 exactly when every
    evaluated image arrives with its own label, lower for any misaligned row."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.images, self.labels = images.flatten(1), labels

    def forward(self, x):
        nearest = torch.cdist(x.flatten(1), self.images).argmin(1)
        return torch.nn.functional.one_hot(self.labels[nearest], 10).float()


def test_robustbench_source_reads_the_released_layout(tmp_path, monkeypatch, mnist_run):
    """A stand-in CIFAR-10-C whose 'corrupted' rows are the clean test images, in test order, read through
    robustbench's loader: a model that recognises each test image scores 1 on every set, so every row
    came with its own label. The stand-in test split is the embedded one in its fixed random order (the
    stored split is sorted by class, and the released loader reads the first n rows)."""
    from normlab.data import TensorImages, fixed_order

    stored = mnist_run.data.test
    order = fixed_order(len(stored))
    test = TensorImages(stored.images[order], stored.labels[order], stored.image_size)
    monkeypatch.setattr(mnist_run.data, "test", test)
    n = 48
    assert len(set(test.labels[:n].tolist())) >= 8
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    np.save(folder / "labels.npy", np.tile(test.labels.numpy().astype(np.uint8), 50)[:50_000])
    images = test.images[:n].permute(0, 2, 3, 1).numpy()
    for name in ("fog",):
        arr = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(50_000, 32, 32, 3))
        for s in range(5):
            arr[s * 10_000:s * 10_000 + n] = images
        arr.flush()
        del arr
    monkeypatch.setattr(mnist_run.data, "name", "cifar10")
    oracle = _Oracle(torch.stack([test[i][0] for i in range(n)]), test.labels[:n])
    monkeypatch.setattr(mnist_run, "model", oracle)
    report = Report()
    cfg = C.CorruptionsConfig(source="robustbench", data_dir=str(tmp_path), corruptions=["fog"], severities=[2, 5],
                              n_examples=n, batch_size=16)
    EVALUATORS["corruptions"].fn(oracle, Context(run=mnist_run), report, cfg)
    m = report.metrics
    assert len([k for k in m if k.count("/") == 3 and k.endswith("/acc")]) == 2
    assert m["corruptions/clean_acc"] == 1.0
    assert m["corruptions/fog/2/acc"] == m["corruptions/fog/5/acc"] == 1.0
    assert m["corruptions/drop"] == 0.0
    # and misaligned labels would have shown: the oracle on the rows shifted by one scores far below 1
    with torch.no_grad():
        shifted = oracle(torch.stack([test[i][0] for i in range(1, n + 1)])).argmax(1)
    assert float((shifted == test.labels[:n]).float().mean()) < 0.5


def test_ce_and_mce_follow_reference():
    # a model with AlexNet's error at every severity has CE 1 on every corruption
    assert C.mce_term([C.ALEXNET_ERR["fog"]] * 5, "fog") == pytest.approx(1.0)
    errs = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert C.mce_term(errs, "brightness") == pytest.approx(1.5 / (5 * 0.564592))


def test_image_folder_below_32_pixels_is_enlarged_for_corruption_and_resized_back(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            d = tmp_path / "imgs" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    r = built_run({"corruptions": ["fog", "pixelate"], "severities": [2], "workers": 1,
                   "cache_dir": str(tmp_path / "cache")},
                  data={"name": "imagefolder", "root": str(tmp_path / "imgs"), "image_size": 24, "batch_size": 2})
    m = evaluate(r)
    (root,) = (tmp_path / "cache").iterdir()
    assert root.name.startswith("imagefolder-") and root.name.endswith("-val-24px")
    clean = np.load(root / "clean.npy")
    index = np.load(root / "index.npy")
    assert clean.shape == (6, 32, 32, 3)  # the 24 px test images, enlarged before corruption
    small = (r.data.test[int(index[0])][0] * 255).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(clean[0], ic.at_least_32(small))
    fog = np.load(root / "ImageFolder-C" / "fog.npy")
    assert fog.shape == (30, 32, 32, 3)  # 5 blocks of the 6 images: no padding outside robustbench's layouts
    assert np.load(root / "ImageFolder-C" / "labels.npy").tolist() == [r.data.test.targets[i] for i in index] * 5
    batches = C._Batches(r, fog[6:12], np.zeros(6), batch_size=4)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 24, 24), (2, 3, 24, 24)]
    assert {"corruptions/fog/2/acc", "corruptions/pixelate/2/acc", "corruptions/acc"} <= set(m)


def test_imagenet_c_through_robustbench_reports_ce_and_mce(tmp_path, monkeypatch):
    """A stand-in ImageNet-C whose images are the clean validation crops: CE = mean error / AlexNet's error.

    robustbench's loader reads its own list of 5,000 validation ids (needing every class folder), so the
    stand-in has one small image per class and, for the first n ids, the real file names.
    """
    from PIL import Image

    from normlab.adapters.robustbench import import_robustbench

    n, names = 6, ["fog", "contrast"]
    ids_file = Path(import_robustbench().__file__).parent / "helper_files" / "imagenet_test_image_ids.txt"
    ids = ids_file.read_text().split()
    wnids = sorted({i.split("/")[0] for i in ids})
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for w in wnids:
            (tmp_path / "imgs" / split / w).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / split / w / "x.png")
    for i in ids[:n]:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "val" / i, "PNG")
    for name in names:  # the folders first: a run whose released set is missing is refused before training
        for s in range(1, 6):
            for w in wnids:
                (tmp_path / "rb" / "ImageNet-C" / name / str(s) / w).mkdir(parents=True)
    r = built_run({"source": "robustbench", "data_dir": str(tmp_path / "rb"), "corruptions": names,
                   "n_examples": n}, data={"name": "imagefolder", "root": str(tmp_path / "imgs")})
    test = r.data.test
    for name in names:
        for s in range(1, 6):
            top = tmp_path / "rb" / "ImageNet-C" / name / str(s)
            for i in ids[:n]:  # the val transform's output, saved as ImageNet-C saves its crops
                crop = test.transform(Image.open(tmp_path / "imgs" / "val" / i).convert("RGB"))
                Image.fromarray((crop * 255).round().byte().permute(1, 2, 0).numpy()).save(top / i, "PNG")
    monkeypatch.setattr(C, "COMMON", tuple(names))  # so that these two count as "all" for the mCE
    m = evaluate(r)
    clean_err = 1 - m["corruptions/clean_acc"]
    for name in names:
        for s in range(1, 6):
            assert m[f"corruptions/{name}/{s}/acc"] == m["corruptions/clean_acc"]
        assert m[f"corruptions/{name}/ce"] == pytest.approx(clean_err / C.ALEXNET_ERR[name])
    assert m["corruptions/mce"] == pytest.approx(np.mean([clean_err / C.ALEXNET_ERR[n] for n in names]))
