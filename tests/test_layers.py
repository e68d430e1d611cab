"""Numerical tests for normlab's layer building blocks: splits, norm wrapping, routing, FiLM, context."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.testing import assert_close

from normlab.context import Context, Routing, current
from normlab.layers import FiLM, NormAct, RoutedNorm, Split, as_norm_act, batch_norms, iter_norms, map_norms
from normlab.layers import replace_module, split_model, split_points
from normlab.model import NormlabNet

pytestmark = pytest.mark.usefixtures("one_thread")


MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FAMILIES = ["ResNet", "DenseNet", "EfficientNet", "RegNet", "NormFreeNet"]

# model name -> split points exercised (at least two per family, including the first and last point)
SPLITS = {
    "resnet18": ["conv1", "act1", "layer1", "layer3", "layer4"],
    "densenet121": ["features.norm0", "features.denseblock1", "features.transition2", "features.norm5"],
    "efficientnet_b0": ["bn1", "blocks.1", "blocks.5", "bn2"],
    "regnetx_002": ["stem", "s1", "s3", "final_conv"],
    "nf_resnet26": ["stem", "stages.0", "stages.2", "final_act"],
}


def _make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10)


def _warm_stats(model: nn.Module, n: int = 1) -> nn.Module:
    """Give BN layers non-trivial running statistics, then switch to eval mode."""
    model.train()
    with torch.no_grad():
        for i in range(n):
            torch.manual_seed(100 + i)
            model(torch.rand(4, 3, 32, 32) * 2 + 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = _warm_stats(_make(name))
        return cache[name]

    return get


def _x(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(n, 3, size, size)


# ----------------------------------------------------------------------------- 1. split == model


@pytest.mark.parametrize("name", list(SPLITS))
def test_split_tail_front_equals_model(models, name):
    model = models(name)
    x = _x()
    with torch.no_grad():
        ref = model(x)
        for layer in SPLITS[name]:
            split = split_model(model, layer)
            f = split.front(x)
            assert f.dim() == 4, layer
            assert_close(split.tail(f), ref, atol=1e-5, rtol=1e-5, msg=f"{name} split at {layer}")


@pytest.mark.parametrize("name", list(SPLITS))
def test_split_of_normlabnet_applies_normalisation(models, name):
    backbone = models(name)
    net = NormlabNet(backbone, MEAN, STD).eval()
    x = _x()
    layer = SPLITS[name][1]
    with torch.no_grad():
        ref = net(x)
        split = Split(net, layer)
        f = split.front(x)
        assert_close(split.tail(f), ref, atol=1e-5, rtol=1e-5)
        # front == bare-backbone front on normalised input
        bare = Split(backbone, layer)
        x_norm = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        assert_close(f, bare.front(x_norm), atol=1e-5, rtol=1e-5)
        # the normalisation matters: skipping it gives different features
        assert not torch.allclose(bare.front(x), f, atol=1e-3)


def test_split_is_a_view_that_sees_replaced_layers(models):
    model = copy.deepcopy(models("resnet18"))
    split = split_model(model, "layer2")
    replace_module(model, "layer1", nn.Identity())  # layer1 keeps the shape, so Identity fits
    x = _x()
    with torch.no_grad():
        f = split.front(x)
        manual = model.layer2(model.maxpool(model.act1(model.bn1(model.conv1(x)))))
        assert_close(f, manual)
        assert_close(split.tail(f), model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 2. split errors


def test_split_unknown_layer_lists_valid_layers(models):
    model = models("resnet18")
    with pytest.raises(ValueError) as e:
        split_model(model, "layer9")
    msg = str(e.value)
    assert "'layer9'" in msg
    for valid in ("conv1", "layer1", "layer4"):
        assert valid in msg
    with pytest.raises(ValueError, match="features.denseblock1"):
        split_model(models("densenet121"), "denseblock1")  # must be the dotted name


@pytest.mark.parametrize("make", [
    lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
], ids=["vit", "sequential"])
def test_split_unsupported_model_names_families(make):
    model = make()
    for call in (lambda: split_points(model), lambda: split_model(model, "0"),
                 lambda: Split(NormlabNet(model, MEAN, STD), "0")):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert type(model).__name__ in msg
        for fam in FAMILIES:
            assert fam in msg


# ----------------------------------------------------------------------------- 3. split point order


def test_split_points_resnet18():
    assert split_points(_make("resnet18")) == ["conv1", "bn1", "act1", "maxpool",
                                               "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name", list(SPLITS))
def test_split_points_follow_forward_order(models, name):
    model = models(name)
    points = split_points(model)
    assert len(points) == len(set(points))
    calls: list[str] = []
    handles = [model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: calls.append(p))
               for p in points]
    try:
        with torch.no_grad():
            model(_x(n=2))
    finally:
        for h in handles:
            h.remove()
    assert calls == points


# ----------------------------------------------------------------------------- 4. parameter partition


@pytest.mark.parametrize("name", list(SPLITS))
def test_split_parameters_partition_backbone(models, name):
    model = models(name)
    all_ids = [id(p) for p in model.parameters()]
    named = dict(model.named_parameters())
    for layer in SPLITS[name]:
        split = split_model(NormlabNet(model, MEAN, STD), layer)
        front = [id(p) for p in split.front_parameters()]
        tail = [id(p) for p in split.tail_parameters()]
        assert len(front) == len(set(front)) and len(tail) == len(set(tail))
        assert not set(front) & set(tail)
        assert set(front) | set(tail) == set(all_ids)
        assert len(front) + len(tail) == len(all_ids)
        assert tail, "the classifier is always in the tail"
        # front parameters are exactly those named under a front layer
        expect_front = {id(p) for n, p in named.items()
                        if any(n.startswith(f + ".") for f in split.front_names)}
        assert set(front) == expect_front
        # tail prefixes cover exactly the tail parameters
        prefixes = split.tail_prefixes()
        by_prefix = {id(p) for n, p in named.items() if any(n.startswith(t + ".") for t in prefixes)}
        assert by_prefix == set(tail)


# ----------------------------------------------------------------------------- 5. as_norm_act


def _random_bn_(bn: nn.BatchNorm2d, seed: int = 3) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) * 2 + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.2)
        bn.num_batches_tracked.fill_(7)
    return bn


def _check_norm_act_equal(orig: nn.Module, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(6, orig.num_features, 8, 8) * 2 + 0.5
    out = {}
    for mode in ("eval", "train"):
        a = copy.deepcopy(orig).train(mode == "train")
        b = copy.deepcopy(a)
        wrapped = as_norm_act(b)
        assert isinstance(wrapped, NormAct)
        assert type(wrapped.norm) is nn.BatchNorm2d
        assert wrapped.act is b.act and wrapped.drop is b.drop
        assert wrapped.norm.training == (mode == "train")
        torch.manual_seed(11)
        ya = a(x.clone())
        torch.manual_seed(11)
        yb = wrapped(x.clone())
        assert_close(yb, ya, msg=f"{mode} output")
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(wrapped.norm, buf), getattr(a, buf), msg=f"{mode} {buf}")
        out[mode] = yb
    # train and eval differ (stats are not the batch's), so both modes were really exercised
    assert not torch.allclose(out["train"], out["eval"], atol=1e-3)
    return out["eval"], out["train"]


def test_as_norm_act_batchnormact_relu():
    orig = _random_bn_(timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU))
    y_eval, y_train = _check_norm_act_equal(orig)
    for y in (y_eval, y_train):
        assert (y >= 0).all()
        assert (y == 0).any() and (y > 0).any()


def test_as_norm_act_silu_and_drop():
    orig = _random_bn_(timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout))
    y_eval, y_train = _check_norm_act_equal(orig)
    # SiLU has negatives down to about -0.278; dropout zeros some of the train outputs
    assert (y_eval < 0).any() and y_eval.min() > -0.2785
    assert (y_train == 0).any()
    assert isinstance(as_norm_act(copy.deepcopy(orig)).drop, nn.Dropout)


@pytest.mark.parametrize("make", [lambda: timm.layers.BatchNormAct2d(8), lambda: nn.BatchNorm2d(8)],
                         ids=["bnact", "bn"])
def test_as_norm_act_keeps_training_flag(make):
    wrapped = as_norm_act(make().eval())
    assert wrapped.norm.training is False
    assert wrapped.training is False


def test_as_norm_act_without_act_and_plain_bn():
    orig = _random_bn_(timm.layers.BatchNormAct2d(8, apply_act=False))
    y_eval, _ = _check_norm_act_equal(orig)
    assert (y_eval < 0).any()
    bn = _random_bn_(nn.BatchNorm2d(8)).eval()
    na = as_norm_act(bn)
    assert na.norm is bn  # a plain BN is wrapped, not copied
    assert as_norm_act(na) is na
    x = torch.randn(4, 8, 5, 5)
    assert_close(na(x), bn(x))
    with pytest.raises(TypeError):
        as_norm_act(nn.LayerNorm(8))


# ----------------------------------------------------------------------------- 6. RoutedNorm


def _bn_pair(seed: int = 3):
    bn = _random_bn_(nn.BatchNorm2d(8), seed)
    return bn, copy.deepcopy(bn)


def test_routed_norm_single_route_equals_bn():
    torch.manual_seed(0)
    x = torch.randn(6, 8, 7, 7) * 1.5 + 0.7
    for ctx in (None, Context(), Context(route="clean")):
        bn, ref = _bn_pair()
        routed = RoutedNorm([bn], ["clean"])

        def run(m, x):
            if ctx is None:
                return m(x)
            with ctx.active():
                return m(x)

        routed.eval(), ref.eval()
        assert_close(run(routed, x), ref(x))
        routed.train(), ref.train()
        y = run(routed, x)
        assert_close(y, ref(x))
        # train mode used batch statistics: the output is normalised per channel
        assert_close(((y - bn.bias.view(1, -1, 1, 1)) / bn.weight.view(1, -1, 1, 1)).mean((0, 2, 3)),
                     torch.zeros(8), atol=1e-5, rtol=0)
        assert_close(bn.running_mean, ref.running_mean)
        assert_close(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 8


def test_routed_norm_copies_only_active_route_updates():
    bn = _random_bn_(nn.BatchNorm2d(8))
    routed = RoutedNorm.copies(bn, ["clean", "adv"]).train()
    assert routed.routes[0] is bn and routed.routes[1] is not bn
    for a, b in zip(routed.routes[0].state_dict().values(), routed.routes[1].state_dict().values()):
        assert torch.equal(a, b)  # copies start identical, statistics included
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in zip(routed.names, routed.routes)}
    ref = copy.deepcopy(bn)
    torch.manual_seed(0)
    x = torch.randn(6, 8, 7, 7) + 2.0
    with Context(route="adv").active():
        y = routed(x)
    assert_close(y, ref(x))
    clean, adv = routed.routes
    for k, v in clean.state_dict().items():
        assert torch.equal(v, before["clean"][k]), k
    assert not torch.equal(adv.running_mean, before["adv"]["running_mean"])
    assert not torch.equal(adv.running_var, before["adv"]["running_var"])
    assert int(adv.num_batches_tracked) == 8
    assert_close(adv.running_mean, ref.running_mean)
    assert_close(adv.running_var, ref.running_var)
    # no context / route None -> the first route
    routed(x)
    assert not torch.equal(clean.running_mean, before["clean"]["running_mean"])
    with Context(route="nope").active(), pytest.raises(KeyError, match="nope"):
        routed(x)


def test_routed_norm_keyed_on_width():
    a, b = _bn_pair(1)[0], _bn_pair(2)[0]
    routed = RoutedNorm([a, b], [0.5, 1.0], key="width").eval()
    x = torch.randn(2, 8, 3, 3)
    with Context(width=1.0, route="0.5").active():
        assert_close(routed(x), b(x))
    with Context(width=0.5).active():
        assert_close(routed(x), a(x))
    assert not torch.allclose(a(x), b(x))


# ----------------------------------------------------------------------------- 7. per-sample routing


@pytest.mark.parametrize("index", [[0, 0, 0, 1, 1], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0]],
                         ids=["sorted", "unsorted", "reversed"])
def test_per_sample_routing_matches_independent_bns(index):
    names = ("clean", "adv")
    idx = torch.tensor(index)
    routing = Routing(idx, names)
    is_sorted = index == sorted(index)
    assert (routing.perm is None) == is_sorted
    assert (routing.inverse is None) == is_sorted
    assert routing.counts == [index.count(0), index.count(1)]
    assert len(routing) == 5
    if not is_sorted:
        assert_close(idx[routing.perm], idx.sort(stable=True).values)
        assert torch.equal(routing.perm[routing.inverse], torch.arange(5))

    bns = [_random_bn_(nn.BatchNorm2d(8), s) for s in (1, 2)]
    refs = copy.deepcopy(bns)
    routed = RoutedNorm(bns, names).train()
    torch.manual_seed(0)
    x = torch.randn(5, 8, 6, 6) * 2 + 1
    x[idx == 1] += 3.0  # the two routes see different data
    with Context(route=routing).active():
        y = routed(x)
    assert y.shape == x.shape
    for r, ref in enumerate(refs):
        sel = idx == r
        ref.train()
        assert_close(y[sel], ref(x[sel]), msg=f"route {r}")
        assert_close(bns[r].running_mean, ref.running_mean)
        assert_close(bns[r].running_var, ref.running_var)
    # a single BN over the whole batch would have given something else
    mixed = copy.deepcopy(refs[0]).train()(x)
    assert not torch.allclose(y[idx == 0], mixed[idx == 0], atol=1e-3)

    routed.eval()
    with Context(route=routing).active():
        y = routed(x)
    for r, ref in enumerate(refs):
        sel = idx == r
        assert_close(y[sel], ref.eval()(x[sel]))


def test_per_sample_routing_single_route_present():
    bns = [_random_bn_(nn.BatchNorm2d(4), s) for s in (1, 2)]
    refs = copy.deepcopy(bns)
    routed = RoutedNorm(bns, ["a", "b"]).train()
    x = torch.randn(3, 4, 5, 5)
    with Context(route=Routing(torch.tensor([1, 1, 1]), ("a", "b"))).active():
        y = routed(x)
    assert_close(y, refs[1].train()(x))
    assert torch.equal(bns[0].running_mean, refs[0].running_mean)


def test_context_subset_keeps_fields_aligned():
    idx = torch.tensor([1, 0, 1, 0, 0])
    lam = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    cond = torch.arange(10.0).view(5, 2)
    ctx = Context(lam=lam, condition=cond, route=Routing(idx, ("clean", "adv")), epoch=3, adv_route="adv")
    for sel in (torch.tensor([4, 0, 2]), torch.tensor([False, True, True, False, True])):
        sub = ctx.subset(sel)
        expect = torch.arange(5)[sel]
        assert_close(sub.lam, lam[expect])
        assert_close(sub.condition, cond[expect])
        assert isinstance(sub.route, Routing)
        assert torch.equal(sub.route.index, idx[expect])
        assert sub.route.names == ("clean", "adv")
        assert sub.route.counts == [int((idx[expect] == 0).sum()), int((idx[expect] == 1).sum())]
        assert sub.epoch == 3 and sub.adv_route == "adv"
    assert ctx.subset(torch.tensor([1, 3, 0])).route.perm is None  # route indices [0, 0, 1] are sorted
    assert ctx.subset(torch.tensor([0, 1])).route.perm is not None  # [1, 0] is not
    # original untouched; non-tensor route passes through
    assert_close(ctx.lam, lam)
    assert Context(route="adv", lam=lam).subset(torch.tensor([0])).route == "adv"


# ----------------------------------------------------------------------------- 8. FiLM


def test_film_identity_when_fresh_or_unconditioned():
    torch.manual_seed(0)
    film = FiLM(8, 16)
    x = torch.randn(4, 8, 5, 5)
    with Context(condition=torch.randn(4, 16)).active():
        assert torch.equal(film(x), x)
    with Context(condition=None).active():
        assert torch.equal(film(x), x)
    assert torch.equal(film(x), x)  # default context


def test_film_matches_hand_computation():
    torch.manual_seed(0)
    film = FiLM(8, 16, hidden=12)
    with torch.no_grad():
        for mlp in (film.scale, film.shift):
            mlp[2].weight.normal_(0, 0.5)
            mlp[2].bias.normal_(0, 0.5)
    x = torch.randn(4, 8, 5, 5)
    c = torch.randn(4, 16)

    def mlp(m, c):
        h = torch.relu(c @ m[0].weight.T + m[0].bias)
        return h @ m[2].weight.T + m[2].bias

    expect = x * (1 + mlp(film.scale, c)[:, :, None, None]) + mlp(film.shift, c)[:, :, None, None]
    with Context(condition=c).active():
        y = film(x)
    assert not torch.allclose(y, x, atol=1e-3)
    assert_close(y, expect)
    # per-sample: a different condition row changes only that sample
    c2 = c.clone()
    c2[1] += 1.0
    with Context(condition=c2).active():
        y2 = film(x)
    assert_close(y2[[0, 2, 3]], y[[0, 2, 3]])
    assert not torch.allclose(y2[1], y[1], atol=1e-4)
    with Context(condition=torch.randn(3, 16)).active(), pytest.raises(ValueError, match="3 rows"):
        film(x)


def test_film_inside_norm_act():
    torch.manual_seed(0)
    bn = _random_bn_(nn.BatchNorm2d(8)).eval()
    film = FiLM(8, 4)
    with torch.no_grad():
        film.shift[2].bias.fill_(-100.0)  # pushes everything negative before the act
    na = NormAct(bn, act=nn.ReLU(), film=film)
    x = torch.randn(2, 8, 3, 3)
    with Context(condition=torch.randn(2, 4)).active():
        assert torch.equal(na(x), torch.zeros_like(x))
    assert_close(na(x), torch.relu(bn(x)))  # no condition -> film is the identity


# ----------------------------------------------------------------------------- 9. map_norms / iter_norms


def test_map_norms_resnet18_as_norm_act_keeps_output(models):
    model = copy.deepcopy(models("resnet18"))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 20
    names = [n for n, _ in iter_norms(model)]
    assert len(names) == n_bn == len(set(names))
    assert names[0] == "bn1" and "layer1.0.bn1" in names and "layer4.1.bn2" in names
    x = _x()
    with torch.no_grad():
        ref = model(x)
    visited = []
    n = map_norms(model, lambda name, m: (visited.append(name), as_norm_act(m))[1])
    assert n == n_bn and visited == names
    assert isinstance(model.layer1[0].bn1, NormAct)
    # outermost only: the wrapped BNs are not visited again, but batch_norms still finds them
    assert [nm for nm, _ in iter_norms(model)] == names
    assert all(isinstance(m, NormAct) for _, m in iter_norms(model))
    assert len(list(batch_norms(model))) == n_bn
    assert map_norms(model, lambda name, m: m) == 0  # returning the same module is no replacement
    assert map_norms(model, lambda name, m: None) == 0
    with torch.no_grad():
        assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_map_norms_efficientnet_keeps_fused_activations(models):
    model = copy.deepcopy(models("efficientnet_b0"))
    n_bnact = sum(isinstance(m, timm.layers.BatchNormAct2d) for m in model.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bnact > 0
    x = _x()
    with torch.no_grad():
        ref = model(x)
    assert map_norms(model, lambda name, m: as_norm_act(m)) == n_bn == len(list(iter_norms(model)))
    assert not any(isinstance(m, timm.layers.BatchNormAct2d) for m in model.modules())
    with torch.no_grad():
        assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    # and the split still reproduces the model after the replacement
    split = split_model(model, "blocks.2")
    with torch.no_grad():
        assert_close(split.tail(split.front(x)), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 10. Context


def test_context_using_restores_previous():
    assert current().route is None and current().condition is None
    outer = Context(route="clean", epoch=2, step=5)
    with outer.active():
        assert current() is outer
        with outer.using(route="adv", perturb=True) as inner:
            assert current() is inner and inner is not outer
            assert (current().route, current().perturb, current().epoch, current().step) == ("adv", True, 2, 5)
            with inner.using(route="third"):
                assert current().route == "third"
            assert current() is inner
        assert current() is outer
        assert (outer.route, outer.perturb) == ("clean", False)  # the original is not mutated
        try:
            with outer.using(route="adv"):
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert current() is outer  # restored on exceptions too
    assert current().route is None and current().epoch == 0
