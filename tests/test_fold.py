"""BN folding for inner loops (issue 18): a folded eval-mode tail computes what the plain one does, the
training forwards never fold, and nothing stored changes."""

import pytest
import torch
from torch import nn

import normlab_advbn as advbn
from normlab.config import parse_run
from normlab.context import Context
from normlab.layers import FiLM, NormAct, RoutedNorm, Split, check_folded, folded
from normlab.runner import prepare

pytestmark = pytest.mark.usefixtures("one_thread")


def advbn_run(model, layer):
    cfg = parse_run({"seed": 0, "model": {"name": model}, "data": {"batch_size": 16},
                     "train": {"val_examples": 100, "device": "cpu", "epochs": 1},
                     "plugins": {"advbn": {"layer": layer}}, "evaluate": {}}, "test.yaml")
    run = prepare(cfg, "test.yaml", quiet=True)
    run.build()
    torch.manual_seed(0)
    with torch.no_grad():  # distinct, non-trivial statistics and affine parameters in every BN route
        for m in run.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return run


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# pairs: every BN of the tail (15, 29, 34, 39); DenseNet's BNs after a conv (52 of 108: the others are
# pre-activation BNs after a concatenation)
@pytest.mark.parametrize("name,layer,pairs", [("resnet18", "layer1", 15), ("resnet50", "layer2", 29),
                                              ("efficientnet_b0", "blocks.2", 34), ("regnetx_002", "s1", 39),
                                              ("densenet121", "features.denseblock1", 52)])
def test_a_folded_tail_gives_the_same_logits_and_multiplier_gradients(name, layer, pairs):
    run = advbn_run(name, layer)
    model, split = run.model.eval(), Split(run.model, layer)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = split.front(x)
    before = state(model)
    y = torch.arange(8) % 10
    out = {}
    for fold in (False, True):
        with Context(run=run, route="aux").active():
            d_sigma = torch.ones(1, f.shape[1], 1, 1, requires_grad=True)
            d_mu = torch.ones(1, f.shape[1], 1, 1, requires_grad=True)
            ctx = folded(split.tail_modules()) if fold else torch.enable_grad()
            with ctx as n:
                logits = split.tail(advbn.perturb(f, f.mean((0, 2, 3), keepdim=True), d_sigma * 1.1, d_mu * 0.9,
                                                  clamp=False))
                grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), (d_sigma, d_mu))
            if fold:
                assert n == pairs
        out[fold] = logits.detach(), grads
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-4)
    for g_fold, g_plain in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(g_fold, g_plain, rtol=1e-3, atol=1e-5 * float(g_plain.abs().max()))
    after = state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bitwise: nothing stored changed
    assert not any("forward" in vars(m) for m in model.modules())  # every shadowed forward given back
    assert check_folded(lambda: split.tail(f), split.tail_modules())


def test_training_mode_never_folds_and_per_sample_routing_is_left_alone():
    run = advbn_run("resnet18", "layer1")
    split = Split(run.model, "layer1")
    run.model.train()
    with Context(run=run, route="aux").active(), folded(split.tail_modules()) as n:
        assert n == 0
    run.model.eval()
    ctx = Context(run=run)
    ctx.set_route(torch.tensor([0, 1, 0, 1]), ("main", "aux"))
    with ctx.active(), folded(split.tail_modules()) as n:
        assert n == 0  # every tail BN (shortcuts too) is routed, and routes per sample here


def test_routed_and_film_conditioned_bns_fold_for_the_selected_route():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    bns = [nn.BatchNorm2d(4).eval(), nn.BatchNorm2d(4).eval()]
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
    film = FiLM(4, 2)
    with torch.no_grad():
        for p in film.parameters():
            p.uniform_(-0.3, 0.3)
    block = nn.Sequential(conv, NormAct(RoutedNorm(bns, ("clean", "adv")), film=film, act=nn.ReLU())).eval()
    x = torch.rand(5, 3, 6, 6)
    for route in ("clean", "adv"):
        with Context(route=route, condition=torch.rand(5, 2)).active() as ctx:
            with torch.no_grad():
                plain = block(x)
                with folded([block]) as n:
                    fold = block(x)
            assert n == 1 and ctx.route == route
            torch.testing.assert_close(fold, plain, rtol=1e-5, atol=1e-6)


def test_an_advbn_step_folds_checks_once_and_changes_nothing_it_should_not(monkeypatch):
    run = advbn_run("resnet18", "layer1")
    split = Split(run.model, "layer1")
    model = run.model.eval()
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = split.front(x)
    y = torch.arange(16) % 10
    before = state(model)
    ctx = Context(run=run, training=True)
    outs = {fold: advbn.adversarial_features(model, split, f, y, advbn.Config(fold=fold), True, ctx)
            for fold in (True, False)}
    assert run.state["advbn"]["fold_checked"] is True
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-4)  # same multipliers found
    after = state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("name,bns", [("efficientnet_b0", 49), ("resnet18", 20)])
def test_a_whole_timm_model_folds_every_bn_timms_batchnormact2d_included(name, bns):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
        with folded([model], channels_last=True) as n:
            fold = model(x)
    assert n == bns  # efficientnet_b0's are all timm BatchNormAct2d (bn, drop, act in one module)
    torch.testing.assert_close(fold, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))


@pytest.mark.parametrize("setting,expected", [("cuda", False), (True, True), (False, False)])
def test_the_attacks_memory_format_follows_train_channels_last(monkeypatch, setting, expected):
    """On CPU the folded attack convolves channels-last only when the run file asks (``train.channels_last:
    true``): a gain on some processors and a loss on others; ``cuda`` (the default) keeps CPU runs contiguous."""
    cfg = parse_run({"seed": 0, "model": {"name": "resnet18"}, "data": {"batch_size": 16},
                     "train": {"device": "cpu", "epochs": 1, "channels_last": setting},
                     "plugins": {"advbn": {"layer": "layer1"}}, "evaluate": {}}, "test.yaml")
    run = prepare(cfg, "test.yaml", quiet=True)
    run.build()
    assert run.channels_last is expected
    layouts = []
    real = advbn.folded_if_exact

    def spy(*args, channels_last=False, **kwargs):
        layouts.append(channels_last)
        return real(*args, channels_last=channels_last, **kwargs)

    monkeypatch.setattr(advbn, "folded_if_exact", spy)
    split = Split(run.model, "layer1")
    model = run.model.eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = split.front(x)
    advbn.adversarial_features(model, split, f, torch.arange(8) % 10, advbn.Config(), True,
                               Context(run=run, training=True))
    assert layouts == [expected]
