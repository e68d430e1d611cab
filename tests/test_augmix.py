"""AugMix plugin: torchvision's views on the uint8 image, batch layout, JSD loss by hand, split BN, workers."""

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab_augmix as augmix
from normlab.context import Context
from normlab.data import Batch, embedded_mnist
from normlab.errors import UsageError
from normlab.layers import RoutedNorm
from normlab.train import LossTerms

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_run(**cfg):
    config = augmix.Config(**cfg)
    train = types.SimpleNamespace(label_smoothing=0.0)
    data = types.SimpleNamespace(train=embedded_mnist()[1], train_workers=0)
    return types.SimpleNamespace(plugin_config=lambda name: config, enabled=["augmix"], source="run.yaml",
                                 config=types.SimpleNamespace(train=train), data=data)


def test_views_are_torchvision_augmix_of_the_uint8_image_with_the_papers_operations():
    from torchvision.transforms import AugMix

    run = fake_run(views=2, severity=3)
    augmix.on_model(model=None, run=run)
    ds = run.data.train
    assert isinstance(ds, augmix.AugMixViews) and run.data.train_workers == 2
    torch.manual_seed(5)
    x, y, extra = ds[7]
    views = extra["views"]
    assert views.shape == (2, 3, 32, 32) and views.min() >= 0 and views.max() <= 1
    assert not torch.equal(views[0], x) and not torch.equal(views[0], views[1])
    # the same draws through torchvision directly give the same views
    torch.manual_seed(5)
    ref = AugMix(severity=3, mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=False)
    image = (x * 255).round().to(torch.uint8)
    assert torch.equal(views[0], ref(image).float() / 255)
    assert torch.equal(views[1], ref(image).float() / 255)
    # the default list has none of the operations that overlap the -C corruptions
    ops = set(ds.augmix._augmentation_space(10, (32, 32)))
    assert not ops & {"Brightness", "Color", "Contrast", "Sharpness"} and "Equalize" in ops
    assert {"Brightness", "Contrast"} <= set(augmix.AugMixViews(ds.dataset, augmix.Config(all_ops=True))
                                             .augmix._augmentation_space(10, (32, 32)))


def test_on_batch_stacks_clean_rows_first_then_each_view():
    run = fake_run(views=2, split_bn=True)
    x, views = torch.rand(4, 3, 8, 8), torch.rand(4, 2, 3, 8, 8)
    y = torch.arange(4)
    ctx = Context(run=run, training=True)
    batch = augmix.on_batch(batch=Batch(x, y, {"views": views}), ctx=ctx)
    assert batch.x.shape == (12, 3, 8, 8) and batch.extra == {"n_clean": 4}
    assert torch.equal(batch.x[:4], x) and torch.equal(batch.x[4:8], views[:, 0]) and torch.equal(batch.x[8:], views[:, 1])
    assert torch.equal(batch.y, y.repeat(3))
    assert ctx.route.counts == [4, 8] and ctx.route.perm is None  # sorted: split with views
    plain = Batch(x, y)
    assert augmix.on_batch(batch=plain, ctx=Context(run=run)) is None and plain.x is x


def test_jsd_term_equals_the_formula_and_is_plain_ce_when_views_agree():
    run = fake_run(views=2, jsd_alpha=12.0)
    torch.manual_seed(0)
    logits, y = torch.randn(9, 5), torch.tensor([0, 3, 4]).repeat(3)
    batch = Batch(torch.zeros(9, 1), y, {"n_clean": 3}, logits)
    terms = LossTerms()
    terms.add("ce", F.cross_entropy(logits, y, reduction="none"), 1.0)
    augmix.on_loss(batch=batch, model=None, ctx=Context(run=run), terms=terms)
    p = logits.softmax(1).view(3, 3, 5)  # (split, sample, class)
    m = p.mean(0).clamp(1e-7, 1)
    js = sum((p[i] * (p[i].log() - m.log())).sum(1).mean() for i in range(3)) / 3
    expected = F.cross_entropy(logits[:3], y[:3]) + 12.0 * js
    assert terms["ce"].dim() == 0 and torch.allclose(terms["ce"], expected, atol=1e-6)
    assert terms.weights["ce"] == 1.0
    same = LossTerms()
    same.add("ce", torch.zeros(9))
    batch.logits = logits[:3].repeat(3, 1)
    augmix.on_loss(batch=batch, model=None, ctx=Context(run=run), terms=same)
    assert torch.allclose(same["ce"], F.cross_entropy(logits[:3], y[:3]), atol=1e-6)
    # loss: ce leaves the host's per-sample CE over every row alone
    ce_run = fake_run(views=2, loss="ce")
    kept = LossTerms()
    kept.add("ce", torch.ones(9))
    augmix.on_loss(batch=batch, model=None, ctx=Context(run=ce_run), terms=kept)
    assert torch.equal(kept["ce"], torch.ones(9))


def test_split_bn_routes_clean_and_augmented_rows_to_their_own_statistics():
    run = fake_run(views=2, split_bn=True)
    bn = nn.BatchNorm2d(3)
    routed = augmix.on_batch_norm(name="bn1", module=bn, model=None, run=run)
    assert isinstance(routed, RoutedNorm)
    assert augmix.on_batch_norm(name="bn1", module=bn, model=None, run=fake_run()) is None
    x, views = torch.randn(4, 3, 6, 6), 3 + 2 * torch.randn(4, 2, 3, 6, 6)
    ctx = Context(run=run, training=True)
    batch = augmix.on_batch(batch=Batch(x, torch.arange(4), {"views": views}), ctx=ctx)
    routed.train()
    with ctx.active():
        routed(batch.x)
    clean, aug = (routed.routes[routed.index(n)] for n in ("clean", "aug"))
    # each BN saw exactly its rows: momentum 0.1 from the (0, 1) initial statistics
    assert torch.allclose(clean.running_mean, 0.1 * x.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(aug.running_mean, 0.1 * batch.x[4:].mean((0, 2, 3)), atol=1e-6)
    # evaluation (no route) runs the clean BN
    routed.eval()
    with Context().active():
        assert torch.equal(routed(x), clean(x))


def test_split_bn_with_a_plugin_that_also_routes_bn_is_refused():
    run = fake_run(split_bn=True)
    run.enabled = ["augmix", "advbn"]
    with pytest.raises(UsageError, match=r"run.yaml: plugins.augmix.split_bn: expected false with plugin 'advbn'"):
        augmix.on_model(model=None, run=run)


@pytest.mark.slow
def test_end_to_end_views_come_from_loader_workers(tiny_config, tmp_path, monkeypatch):
    seen = []
    original = augmix.AugMixViews.__getitem__

    def spy(self, i):
        info = torch.utils.data.get_worker_info()
        x, y, extra = original(self, i)
        extra["worker"] = torch.tensor(-1 if info is None else info.id)
        return x, y, extra

    def record(batch, ctx):
        seen.append(batch.extra.pop("worker"))

    monkeypatch.setattr(augmix.AugMixViews, "__getitem__", spy)
    tiny_config["plugins"] = {"augmix": {"views": 2, "workers": 2}, "rec": {}}
    tiny_config["train"]["epochs"] = 1
    tiny_config["data"]["n_train"] = 128
    rec = types.SimpleNamespace(on_batch=normlab.hookimpl(record))
    res = normlab.run(tiny_config, out=tmp_path / "r", plugins={"rec": rec}, quiet=True)
    workers = torch.cat(seen)
    assert workers.numel() == 128 and (workers >= 0).all() and set(workers.tolist()) == {0, 1}
    assert 0.0 <= res.metrics["clean/acc"] <= 1.0
