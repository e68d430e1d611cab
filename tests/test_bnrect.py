"""BN rectification: adapted statistics equal the adaptation batch's, variants, exact restore, routes."""

import pytest
import timm
import torch
from torch import nn

import normlab
import normlab_bnrect as bnrect
from conftest import copy_run, input_batch_stats
from normlab.context import Context
from normlab.layers import RoutedNorm, as_norm_act, map_norms
from normlab.config import parse_run
from normlab.model import NormlabNet
from normlab.runner import prepare
from normlab_registry import PluginSpec, ResolutionError, resolve


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(name="resnet18"):
    torch.manual_seed(0)
    net = NormlabNet(timm.create_model(name, num_classes=10), (0.5,) * 3, (0.25,) * 3)
    # non-trivial source statistics
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.rand(16, 3, 32, 32))
    return net.eval()


def snapshot(model):
    return {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def eval_input_stats(model, x):
    """Per-BN mean and unbiased variance of each BN's input when ``model`` itself runs on ``x`` (eval mode)."""
    stats = {}

    def hook(name):
        def fn(mod, inputs, out):
            stats[name] = bnrect.batch_stats(inputs[0].double())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return stats


@pytest.mark.parametrize("settings", [{}, {"adapt": "mean"}, {"adapt": "var"}, {"prior": 16},
                                      {"prior": 16, "adapt": "mean"}])
def test_layerwise_statistics_are_those_the_adapted_model_produces(settings):
    """Issue 17, bug 2: after adaptation each BN holds the statistics of its input in the adapted model."""
    model = make_model()
    x = torch.rand(32, 3, 32, 32) * 0.6 + 0.4
    before = snapshot(model)
    cfg = bnrect.Config(**settings)
    undo, used, skipped, n = bnrect.rectify(model, x, cfg)
    seen = eval_input_stats(model, x)  # the adapted model, run again on the same samples
    w = cfg.prior / (cfg.prior + n) if cfg.prior is not None else 0.0
    assert len(used) == 20 and not skipped
    for layer in used:
        m = model.get_submodule(layer)
        mean, var = seen[layer]
        mean0, var0 = (t.double() for t in before[layer][:2])
        want_mean = mean0 if cfg.adapt == "var" else w * mean0 + (1 - w) * mean
        want_var = var0 if cfg.adapt == "mean" else w * var0 + (1 - w) * var
        torch.testing.assert_close(m.running_mean.double(), want_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var.double(), want_var, rtol=1e-4, atol=1e-5)
    undo()
    assert all(torch.equal(v[1], before[k][1]) for k, v in snapshot(model).items())


@pytest.mark.parametrize("shape", [(32, 16, 8, 8), (32, 16, 2, 2), (4, 16, 1, 1), (32, 16, 10)])
@pytest.mark.parametrize("affine", [True, False])
def test_estimate_and_normalise_equals_statistics_then_the_eval_forward(shape, affine):
    """Both forms (two reductions where they are faster, else one training-mode kernel with eps / k and
    w / sqrt(k)) store the batch's mean and unbiased variance and return the BN's eval-mode output with them."""
    torch.manual_seed(0)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(16, affine=affine).eval()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    bn.running_mean.fill_(float("nan"))  # stale values must not leak into the estimate
    f = torch.randn(shape) * 3 + 5
    assert bnrect.reductions_faster(f) == (shape == (32, 16, 8, 8))
    with torch.no_grad():
        out = bnrect.estimate_and_normalise(bn, f)
        dims = [0, *range(2, f.dim())]
        var, mean = torch.var_mean(f.double(), dims, correction=1)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, bn(f), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.stack(bnrect.batch_stats(f)), torch.stack([mean, var]).float())


def test_rectify_leaves_no_wrapped_forward_behind():
    model = make_model()
    x = torch.rand(8, 3, 32, 32)
    undo, *_ = bnrect.rectify(model, x, bnrect.Config())
    assert not any("forward" in m.__dict__ for m in model.modules())
    undo()
    model.backbone.fc.register_forward_hook(lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bnrect.rectify(model, x, bnrect.Config())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert snapshot(model).keys() == snapshot(make_model()).keys()
    assert all(torch.equal(a[1], b[1]) for a, b in zip(snapshot(model).values(), snapshot(make_model()).values()))


def test_batch_estimate_of_a_variant_describes_features_the_adapted_model_does_not_produce():
    """The reference code's one train-mode forward, mean-only: deeper layers' means are off."""
    x = torch.rand(32, 3, 32, 32) * 0.6 + 0.4
    errors = {}
    for estimate in ("layerwise", "batch"):
        model = make_model()
        undo, used, *_ = bnrect.rectify(model, x, bnrect.Config(adapt="mean", estimate=estimate))
        seen = eval_input_stats(model, x)
        errors[estimate] = max(float((model.get_submodule(n).running_mean.double() - seen[n][0]).abs().max())
                               for n in used[1:])
        undo()
    assert errors["layerwise"] < 1e-4 and errors["batch"] > 1e-2, errors


@pytest.mark.parametrize("settings", [{"prior": 8}, {"adapt": "mean"}, {}])
def test_per_batch_equals_layerwise_rectification_on_each_batch_and_writes_no_buffer(settings):
    """per_batch (and an adaptive attack's forward) adapts to each forward's own batch: the output equals
    rectify() once on that batch then a forward on it, and no buffer ever moves."""
    model = make_model()
    before = snapshot(model)
    undo = bnrect.per_forward(model, bnrect.Config(per_batch=True, **settings))
    for batch in (torch.rand(16, 3, 32, 32), torch.rand(16, 3, 32, 32) * 0.5):
        with torch.no_grad():
            out = model(batch)
        assert all(torch.equal(v[0], before[k][0]) and torch.equal(v[1], before[k][1])
                   for k, v in snapshot(model).items())
        reference = make_model()
        redo, *_ = bnrect.rectify(reference, batch, bnrect.Config(n_samples=16, **settings))
        with torch.no_grad():
            torch.testing.assert_close(out, reference(batch), rtol=1e-4, atol=1e-4)
        redo()
    undo()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), make_model()(batch), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_batch_estimate_equals_a_train_mode_forward_and_restore_is_exact(name):
    model = make_model(name)
    x = torch.rand(32, 3, 32, 32) * 0.6 + 0.4  # a shifted domain
    expected = input_batch_stats(model, x)
    before = snapshot(model)
    undo, used, _, n = bnrect.rectify(model, x, bnrect.Config(estimate="batch"))
    assert n == 32 and len(used) == len(expected)
    for layer, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, expected[layer][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m.running_var, expected[layer][1], rtol=1e-4, atol=1e-5)
            assert not m.training and m.momentum == 0.1
    undo()
    for layer, (mean, var, count) in snapshot(model).items():
        assert torch.equal(mean, before[layer][0]) and torch.equal(var, before[layer][1])
        assert torch.equal(count, before[layer][2])


def test_one_sample_skips_layers_with_one_value_per_channel_and_adapts_the_rest():
    model = make_model("resnet18")  # at 32x32, layer4 sees 1x1 feature maps
    x = torch.rand(1, 3, 32, 32)
    before = snapshot(model)
    with torch.no_grad():
        model(x)  # eval mode: the forward works on one sample before adaptation
    undo, used, skipped, n = bnrect.rectify(model, x, bnrect.Config(n_samples=1))
    assert n == 1 and skipped and all(s.startswith("backbone.layer4") for s in skipped)
    assert not set(used) & set(skipped) and any(u.startswith("backbone.layer1") for u in used)
    for layer, m in model.named_modules():
        if layer in skipped:
            assert torch.equal(m.running_mean, before[layer][0]) and torch.equal(m.running_var, before[layer][1])
    conv1_mean = model.backbone.conv1(model.normalize(x)).mean((0, 2, 3))
    torch.testing.assert_close(model.backbone.bn1.running_mean, conv1_mean, rtol=1e-4, atol=1e-5)
    undo()
    assert all(torch.equal(v[0], before[k][0]) for k, v in snapshot(model).items())


def test_efficientnet_keeps_fused_activations_after_adaptation():
    model = make_model("efficientnet_b0")
    x = torch.rand(32, 3, 32, 32)
    undo, *_ = bnrect.rectify(model, x, bnrect.Config())
    bn2 = model.backbone.bn2
    assert isinstance(bn2.act, nn.SiLU)
    with torch.no_grad():
        out = bn2(torch.randn(4, bn2.num_features, 2, 2))
    assert out.min() >= -0.2785  # SiLU still applied
    undo()


def test_mean_only_and_variance_only():
    x = torch.rand(32, 3, 32, 32)
    for adapt, kept, changed in (("mean", 1, 0), ("var", 0, 1)):
        model = make_model()
        before = snapshot(model)
        undo, *_ = bnrect.rectify(model, x, bnrect.Config(adapt=adapt))
        after = snapshot(model)
        for layer in before:
            assert torch.equal(after[layer][kept], before[layer][kept]), (adapt, layer)
            assert not torch.equal(after[layer][changed], before[layer][changed]), (adapt, layer)
        undo()


def test_thirds_and_name_filter_change_only_their_layers():
    x = torch.rand(32, 3, 32, 32)
    model = make_model()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    k = len(names)
    for part, chosen in (("front", names[:k // 3]), ("middle", names[k // 3:2 * k // 3]), ("end", names[2 * k // 3:])):
        before = snapshot(model)
        undo, used, *_ = bnrect.rectify(model, x, bnrect.Config(part=part))
        after = snapshot(model)
        assert sorted(used) == sorted(chosen)
        for layer in names:
            assert torch.equal(after[layer][0], before[layer][0]) == (layer not in chosen)
        undo()
    undo, used, *_ = bnrect.rectify(model, x, bnrect.Config(layers=["layer4"]))
    assert used and all(u.startswith("backbone.layer4.") for u in used)
    undo()


def test_prior_mixing_weights():
    x = torch.rand(8, 3, 32, 32)
    model = make_model()
    before = snapshot(model)
    expected = input_batch_stats(model, x)
    undo, *_ = bnrect.rectify(model, x, bnrect.Config(prior=24, n_samples=8, estimate="batch"))
    w = 24 / (24 + 8)
    for layer, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, w * before[layer][0] + (1 - w) * expected[layer][0],
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m.running_var, w * before[layer][1] + (1 - w) * expected[layer][1],
                                       rtol=1e-4, atol=1e-5)
    undo()


def test_routed_bn_rectifies_only_the_route_in_use():
    model = make_model()
    map_norms(model.backbone, lambda name, m: _routed(m))
    before = snapshot(model)
    x = torch.rand(32, 3, 32, 32)
    undo, used, *_ = bnrect.rectify(model, x, bnrect.Config(), Context(route="aux"))
    after = snapshot(model)
    aux = [n for n in before if n.endswith("routes.1")]
    main = [n for n in before if n.endswith("routes.0")]
    assert sorted(used) == sorted(aux) and len(aux) == 20
    assert all(torch.equal(after[n][0], before[n][0]) for n in main)
    assert all(not torch.equal(after[n][0], before[n][0]) for n in aux)
    undo()
    assert all(torch.equal(snapshot(model)[n][1], before[n][1]) for n in before)


@pytest.mark.parametrize("part", ["front", "middle", "end"])
def test_thirds_are_thirds_of_the_layers_whatever_the_routes(part):
    """A routed layer's copies (main/aux, clean/adv, widths) count as one BN layer: a third of a routed
    resnet18 holds the same layers as a third of the plain one, and the route in use adapts all of them."""
    plain = make_model()
    plain_third = [n for n, _ in bnrect.select(plain, bnrect.Config(part=part))]
    routed = make_model()
    map_norms(routed.backbone, lambda name, m: _routed(m))
    chosen = bnrect.select(routed, bnrect.Config(part=part))
    layers = list(dict.fromkeys(bnrect.layer_name(n) for n, _ in chosen))
    assert [n.removesuffix(".norm") for n in layers] == plain_third and len(chosen) == 2 * len(layers)
    undo, used, *_ = bnrect.rectify(routed, torch.rand(32, 3, 32, 32), bnrect.Config(part=part), Context(route="aux"))
    assert sorted(used) == sorted(n for n, _ in chosen if n.endswith("routes.1"))
    undo()


def _routed(m):
    na = as_norm_act(m)
    na.norm = RoutedNorm.copies(na.norm, ("main", "aux"))
    return na


def test_registry_declares_the_nf_conflict():
    spec = PluginSpec("bnrect", conflicts=bnrect.conflicts, extra={"conflict_reasons": bnrect.conflict_reasons})
    with pytest.raises(ResolutionError, match="'bnrect' and 'nf' conflict: nf removes every BN layer"):
        resolve(["nf", "bnrect"], {"bnrect": spec, "nf": PluginSpec("nf")})


def test_end_to_end_acc_and_acc_star_on_style_domains(small_trained, tmp_path):
    domains = "evaluate={clean: {n_examples: 300}, style: {n_examples: 300}}"
    base = normlab.evaluate(copy_run(small_trained, tmp_path / "run"), overrides=[domains], quiet=True)
    again = normlab.evaluate(base.dir, overrides=[domains, "plugins.bnrect={n_samples: 32}"], name="bnrect", quiet=True)
    import json

    results = json.loads((base.dir / "results.json").read_text())
    m = results["metrics"]
    for d in ("invert", "color", "texture"):
        assert f"style/{d}/acc" in m and f"bnrect/style/{d}/acc" in m
    assert m["style/acc"] == base.metrics["style/acc"]  # the unadapted numbers are kept
    rec = results["records"]["bnrect/bnrect"]["domains"]
    assert rec["style/invert"] == {"n_samples": 32, "bn_layers": 15} and "clean" not in rec  # test_resnet's 15
    assert m["bnrect/clean/acc"] == m["clean/acc"]  # the source domain is not adapted by default
    # re-estimating statistics on the inverted digits recovers accuracy the source statistics lose
    assert m["bnrect/style/invert/acc"] > m["style/invert/acc"]
    assert again.metrics["bnrect/style/acc"] == m["bnrect/style/acc"]


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_oat_models_fused_bn_film_is_rectified_on_the_route_in_use(lam):
    """The condition plugin fuses an eval-mode BN with its FiLM (one addcmul that never calls the BN); a BN
    being estimated must run as itself, so bnrect adapts the route lambda selects, each BN to its input's
    statistics in the adapted model, and restores them bitwise."""
    cfg = parse_run({"seed": 0, "model": {"name": "resnet18"}, "adapt_samples": 32, "train": {"epochs": 0},
                     "plugins": {"condition": {"lam": lam}, "pgd": {}, "bnrect": {"domains": ["style/"]}}, "evaluate": {}},
                    "test.yaml")
    run = prepare(cfg, "test.yaml", quiet=True)
    run.build()
    model = run.model.eval()
    x = torch.rand(32, 3, 32, 32) * 0.6 + 0.4
    route = "routes.0" if lam == 0 else "routes.1"
    chosen = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n.endswith(route)}
    others = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not n.endswith(route)}
    before = {n: m.running_mean.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    ctx = Context(run=run)
    with run.domain("style/x", x, ctx):
        assert run.state["bnrect"]["style/x"]["bn_layers"] == len(chosen) == 20
        with ctx.active():
            seen = eval_input_stats(model, x)  # hooks on the BNs: they run as themselves while observed
        for name, m in chosen.items():
            torch.testing.assert_close(m.running_mean, seen[name][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m.running_var, seen[name][1], rtol=1e-4, atol=1e-5)
        assert all(torch.equal(m.running_mean, before[n]) for n, m in others.items())
        with torch.no_grad(), ctx.active():
            fused = model(x)  # no hooks now: the fused path, with the adapted statistics
            hooked = [m.register_forward_hook(lambda *a: None) for m in chosen.values()]
            plain = model(x)
            for h in hooked:
                h.remove()
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(m.running_mean, before[n]) for n, m in model.named_modules() if n in before)
