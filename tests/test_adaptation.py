"""Every test domain offers on_domain a seeded random draw over all of it (issue 17, bug 1).

The embedded test split is stored sorted by class, so "the first batch" of a domain is one digit.
Each domain's samples must be the first ``adapt_samples`` of its fixed random order: covering the
classes as a random draw does, recorded by position in results.json, and the same whatever
``n_examples`` and batch size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab import hookimpl
from normlab.data import fixed_order
from conftest import TINY_MODEL


class Keep:
    """Keeps each domain's samples (first call per domain)."""

    def __init__(self):
        self.samples: dict[str, torch.Tensor] = {}

    @hookimpl
    def on_domain(self, model, domain, samples, ctx):
        self.samples.setdefault(domain, samples.detach().cpu().clone())


def _config(tmp, n: int, batch: int) -> dict:
    few = {"n_examples": n, "batch_size": batch}
    return {
        "seed": 0, "adapt_samples": 32, "model": {"name": TINY_MODEL},
        "data": {"name": "mnist", "image_size": 16, "batch_size": 16},
        "train": {"epochs": 0},
        "plugins": {"keep": {}},
        "evaluate": {"clean": few,
                     "corruptions": {**few, "corruptions": ["fog", "contrast"], "severities": [1], "workers": 1,
                                     "cache_dir": str(tmp / "cache")},
                     "style": few, "divergence": {**few, "layers": ["layer1"], "domains": ["invert"]},
                     "pgd": {**few, "steps": 1}},
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    out = []
    for i, (n, batch) in enumerate([(20, 7), (60, 64)]):
        keep = Keep()
        res = normlab.run(_config(tmp, n, batch), out=tmp / f"run{i}", plugins={"keep": keep}, quiet=True)
        out.append((res, keep))
    return out


DOMAINS = {"clean", "corruptions/fog/1", "corruptions/contrast/1", "style/invert", "style/color", "style/texture"}


def test_every_domain_adapts_on_a_draw_that_covers_the_classes(two_runs):
    res, keep = two_runs[0]
    record = json.loads((res.dir / "results.json").read_text())["records"]["adaptation"]
    assert record["adapt_samples"] == 32
    assert set(record["positions"]) == DOMAINS == set(keep.samples)
    from normlab.data import embedded_mnist

    _, test = embedded_mnist()
    labels = test.labels
    for domain, positions in record["positions"].items():
        assert positions == fixed_order(1000)[:32].tolist()
        assert keep.samples[domain].shape == (32, 3, 16, 16)
        # a random draw of 32 of 10 balanced classes misses more than two with probability < 1e-3;
        # the first 32 rows in file order are all the digit 0
        assert len(set(labels[positions].tolist())) >= 8, domain
        assert len(set(labels[:32].tolist())) == 1
    # the clean samples are exactly those test images; a style domain's are its transform of them
    clean = keep.samples["clean"]
    by_hand = F.interpolate(test.images[positions].float() / 255, size=16, mode="bilinear", align_corners=False)
    assert torch.allclose(clean, by_hand.clamp(0, 1), atol=1e-6)
    assert torch.allclose(keep.samples["style/invert"], 1 - clean, atol=1e-6)


def test_samples_do_not_depend_on_n_examples_or_batch_size(two_runs):
    (a, keep_a), (b, keep_b) = two_runs
    for domain in DOMAINS:
        assert torch.equal(keep_a.samples[domain], keep_b.samples[domain]), domain


def test_corruption_samples_are_the_cached_rows_of_those_positions(two_runs):
    res, keep = two_runs[0]
    root = next(res.dir.parent.glob("cache/mnist-test"))
    index = np.load(root / "index.npy")
    assert index[:32].tolist() == fixed_order(1000)[:32].tolist()
    rows = np.load(root / "CIFAR-10-C" / "fog.npy", mmap_mode="r")[:32]  # severity 1: rows 0..
    x = torch.from_numpy(np.array(rows)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1)
    assert torch.allclose(keep.samples["corruptions/fog/1"], x, atol=1e-6)
