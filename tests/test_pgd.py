"""PGD adversarial training: loss weights equal the lambdas, the attack's budget, modes, routes and seeding."""

import copy
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
import torchattacks

import normlab
import normlab_pgd as pgd
from normlab.context import Context
from normlab.data import Batch
from normlab.errors import UsageError
from normlab.layers import RoutedNorm, as_norm_act, map_norms
from normlab.model import NormlabNet
from normlab.train import LossTerms

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1


def make_model(routed=False):
    torch.manual_seed(0)
    net = NormlabNet(timm.create_model("resnet18", num_classes=10), (0.5,) * 3, (0.25,) * 3)
    if routed:
        map_norms(net.backbone, lambda name, m: _routed(m))
    with torch.no_grad():  # non-trivial statistics; the adv route's differ from the clean route's
        net.train()
        for i in range(2):
            net(torch.rand(16, 3, 16, 16))
            if routed:
                with Context(route="adv").active():
                    net(torch.rand(16, 3, 16, 16) * 0.5 + 0.5)
    return net.train()


def _routed(m):
    na = as_norm_act(m)
    na.norm = RoutedNorm.copies(na.norm, ("clean", "adv"))
    return na


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def fake_run(model, cfg, seed=0, enabled=("pgd",)):
    return SimpleNamespace(config=SimpleNamespace(seed=seed, train=SimpleNamespace(label_smoothing=0.0)),
                           plugin_config=lambda name: cfg, model=model, source="t.yaml", enabled=list(enabled),
                           device=torch.device("cpu"))


def cfg_of(**kw):
    kw.setdefault("eps", EPS)
    kw.setdefault("step_size", 0.04)
    kw.setdefault("steps", 3)
    return pgd.Config(**kw)


def host_forward(model, batch, ctx):
    """The host step up to on_loss: on_batch, the forward, the per-sample ce term."""
    with ctx.active():
        batch = pgd.on_batch(batch=batch, ctx=ctx) or batch
        batch.logits = model(batch.x)
    terms = LossTerms()
    terms.add("ce", F.cross_entropy(batch.logits.float(), batch.y, reduction="none"))
    return batch, terms


def call_on_loss(model, batch, ctx, terms):
    with ctx.active():
        pgd.on_loss(batch=batch, model=model, ctx=ctx, terms=terms)


def ref_attack(model, x, y, cfg, step, route=None, cls=None):
    """The attack run by hand on a copy: eval mode, no parameter grads, the step's seed."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    cls = cls or {"Linf": torchattacks.PGD, "L2": torchattacks.PGDL2}[cfg.norm]
    kw = {} if cls is torchattacks.TPGD else {"random_start": cfg.random_start}
    with torch.random.fork_rng(), Context(route=route).active():
        torch.manual_seed(pgd.attack_seed(fake_run(None, cfg), step))
        return cls(ref, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, **kw)(x, y)


def train_forward_ce(model, x, y, route=None):
    ref = copy.deepcopy(model).train()
    with torch.no_grad(), Context(route=route).active():
        return F.cross_entropy(ref(x), y, reduction="none"), ref


def bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers()}


# --- loss weights --------------------------------------------------------------

def test_lambda_zero_everywhere_gives_plain_ce_and_no_attack():
    model, (x, y) = make_model(), data()
    cfg = cfg_of()
    ctx = Context(run=fake_run(model, cfg), training=True, step=3, lam=torch.zeros(8))
    batch, terms = host_forward(model, Batch(x.clone(), y), ctx)
    assert torch.equal(batch.x, x)  # no pure mode with ctx.lam set
    plain = terms.total().item()
    before = bn_stats(model)
    call_on_loss(model, batch, ctx, terms)
    assert terms.total().item() == pytest.approx(plain, rel=1e-6)
    assert torch.equal(torch.as_tensor(terms.weights["ce"]), torch.ones(8))
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())  # no adversarial forward ran


def test_lambda_one_everywhere_gives_ce_of_x_adv():
    model, (x, y) = make_model(), data()
    cfg = cfg_of()
    ctx = Context(run=fake_run(model, cfg), training=True, step=5, lam=torch.ones(8))
    batch, terms = host_forward(model, Batch(x, y), ctx)
    x_adv = ref_attack(model, x, y, cfg, step=5)
    expected, _ = train_forward_ce(model, x_adv, y)
    call_on_loss(model, batch, ctx, terms)
    assert terms.total().item() == pytest.approx(expected.mean().item(), rel=1e-5)
    # the adversarial loss is larger than the clean one: the attack did something
    assert expected.mean().item() > terms["ce"].mean().item()


def test_mixed_lambdas_are_the_per_sample_weights_under_the_adversarial_route():
    """OAT's setting: per-sample lambda, lambda = 0 rows through the clean BN, the rest attacked via 'adv'."""
    model, (x, y) = make_model(routed=True), data()
    cfg = cfg_of()
    lam = torch.tensor([0.0, 0.0, 0.1, 0.4, 1.0, 0.2, 1.0, 0.3])
    ctx = Context(run=fake_run(model, cfg, enabled=("condition", "pgd")), training=True, step=2, lam=lam,
                  adv_route="adv")
    ctx.set_route((lam != 0).long(), ("clean", "adv"))
    batch, terms = host_forward(model, Batch(x, y), ctx)
    rows = lam != 0
    x_adv = ref_attack(model, x[rows], y[rows], cfg, step=2, route="adv")
    ce_adv, ref = train_forward_ce(model, x_adv, y[rows], route="adv")
    after_host = bn_stats(model)
    call_on_loss(model, batch, ctx, terms)

    assert torch.equal(terms.weights["adv"], lam) and torch.equal(terms.weights["ce"], 1 - lam)
    padded = torch.zeros(8)
    padded[rows] = ce_adv
    torch.testing.assert_close(terms["adv"].detach(), padded, rtol=1e-5, atol=1e-6)
    expected = ((1 - lam) * terms["ce"].detach() + lam * padded).mean()
    assert terms.total().item() == pytest.approx(expected.item(), rel=1e-5)
    # the adversarial forward updated only the 'adv' BNs, exactly as a train-mode forward of x_adv does
    for name, buf in model.named_buffers():
        if ".routes.0." in name:
            assert torch.equal(buf, after_host[name]), name
        elif ".routes.1." in name and "running_mean" in name:
            torch.testing.assert_close(buf, dict(ref.named_buffers())[name], rtol=1e-5, atol=1e-6)
            assert not torch.equal(buf, after_host[name])


def test_combine_mean_weighs_clean_augmented_and_adversarial_views_equally():
    model, (x, y) = make_model(), data(12)
    cfg = cfg_of(combine="mean")
    ctx = Context(run=fake_run(model, cfg), training=True, step=1)
    batch, terms = host_forward(model, Batch(x, y, {"n_clean": 4}), ctx)  # 4 clean rows + 8 AugMix views
    assert torch.equal(batch.x, x)  # not pure
    x_adv = ref_attack(model, x[:4], y[:4], cfg, step=1)
    ce_adv, _ = train_forward_ce(model, x_adv, y[:4])
    call_on_loss(model, batch, ctx, terms)
    assert terms.weights["ce"] == pytest.approx(12 / 16) and terms.weights["adv"] == pytest.approx(4 / 16)
    torch.testing.assert_close(terms["adv"].detach(), ce_adv, rtol=1e-5, atol=1e-6)
    expected = (terms["ce"].detach().sum() + ce_adv.sum()) / 16
    assert terms.total().item() == pytest.approx(expected.item(), rel=1e-5)


def test_pure_mode_makes_the_host_forward_adversarial():
    model, (x, y) = make_model(), data()
    cfg = cfg_of()
    ctx = Context(run=fake_run(model, cfg), training=True, step=7)
    x_adv = ref_attack(model, x, y, cfg, step=7)
    batch, terms = host_forward(model, Batch(x, y), ctx)
    torch.testing.assert_close(batch.x, x_adv, rtol=0, atol=1e-6)
    call_on_loss(model, batch, ctx, terms)
    assert list(terms.losses) == ["ce"] and terms.weights["ce"] == 1.0  # the single forward is the loss


def test_trades_adds_the_kl_term_with_weight_beta():
    model, (x, y) = make_model(), data()
    # unfolded, like the reference attack: TPGD's first steps follow the tiny gradient of a KL near 0, whose
    # signs flip with float rounding (folding is exact up to rounding, not bitwise)
    cfg = cfg_of(trades=True, beta=6.0, fold=False)
    ctx = Context(run=fake_run(model, cfg), training=True, step=4)
    batch, terms = host_forward(model, Batch(x, y), ctx)
    assert torch.equal(batch.x, x)
    x_adv = ref_attack(model, x, y, cfg, step=4, cls=torchattacks.TPGD)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(ref(x_adv), 1), F.softmax(batch.logits.detach(), 1), reduction="none").sum(1)
    call_on_loss(model, batch, ctx, terms)
    assert terms.weights == {"ce": 1.0, "trades": 6.0}
    torch.testing.assert_close(terms["trades"].detach(), kl, rtol=1e-4, atol=1e-6)
    assert kl.mean() > 0


# --- the attack ------------------------------------------------------------------

@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_adversarial_examples_stay_in_the_budget_and_in_unit_range(norm, eps):
    model, (x, y) = make_model(), data()
    cfg = cfg_of(norm=norm, eps=eps, step_size=eps / 2, steps=4)
    ctx = Context(run=fake_run(model, cfg), training=True, step=0)
    x_adv = pgd.adversarial(model, x, y, ctx, cfg)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5) and size.max() > 0.5 * eps
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    ce = lambda v: F.cross_entropy(copy.deepcopy(model).eval()(v), y).item()  # noqa: E731
    assert ce(x_adv) > ce(x)


@pytest.mark.parametrize("change", [{"steps": 0}, {"eps": 0}, {"eps": 0, "steps": 3, "random_start": True}])
def test_no_budget_or_no_steps_leaves_x_unchanged(change):
    model, (x, y) = make_model(), data()
    cfg = cfg_of(**change)
    assert torch.equal(pgd.adversarial(model, x, y, Context(run=fake_run(model, cfg)), cfg), x)


def test_attack_keeps_statistics_modes_and_requires_grad():
    model, (x, y) = make_model(), data()
    frozen_bn = model.backbone.layer1[0].bn1
    frozen_bn.eval()
    model.backbone.conv1.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = bn_stats(model)
    cfg = cfg_of()
    pgd.adversarial(model, x, y, Context(run=fake_run(model, cfg)), cfg)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    # what the plugin guards against: torchattacks alone puts the whole model back in train mode
    torchattacks.PGD(model, eps=EPS, alpha=0.04, steps=1)(x, y)
    assert frozen_bn.training


def test_attack_runs_under_the_adversarial_route():
    model, (x, y) = make_model(routed=True), data()
    cfg = cfg_of(random_start=False)
    ctx = Context(run=fake_run(model, cfg), training=True, step=0, adv_route="adv")
    calls = {"clean": 0, "adv": 0}
    for name, m in model.named_modules():
        if isinstance(m, RoutedNorm):
            for route, bn in zip(m.names, m.routes):
                bn.register_forward_hook(lambda *a, r=route: calls.__setitem__(r, calls[r] + 1))
    x_adv = pgd.adversarial(model, x, y, pgd.rows_context(ctx, slice(None)), cfg)
    assert calls["clean"] == 0 and calls["adv"] == 20 * cfg.steps
    assert torch.equal(x_adv, ref_attack(model, x, y, cfg, 0, route="adv"))
    assert not torch.equal(x_adv, ref_attack(model, x, y, cfg, 0, route="clean"))  # the routes differ


def test_attack_is_fp32_under_autocast():
    model, (x, y) = make_model(), data()
    cfg = cfg_of()
    ctx = Context(run=fake_run(model, cfg), step=1)
    plain = pgd.adversarial(model, x, y, ctx, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pgd.adversarial(model, x, y, ctx, cfg)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_attack_randomness_is_seeded_by_step_and_leaves_the_global_rng_alone():
    model, (x, y) = make_model(), data()
    cfg = cfg_of(steps=1)
    state = torch.get_rng_state()
    a = pgd.adversarial(model, x, y, Context(run=fake_run(model, cfg), step=11), cfg)
    b = pgd.adversarial(model, x, y, Context(run=fake_run(model, cfg), step=11), cfg)
    c = pgd.adversarial(model, x, y, Context(run=fake_run(model, cfg), step=12), cfg)
    d = pgd.adversarial(model, x, y, Context(run=fake_run(model, cfg, seed=1), step=11), cfg)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


# --- settings ------------------------------------------------------------------------

def test_settings_parse_fractions_and_reject_undefined_combinations():
    assert pgd.Config(eps="8/255", step_size="2/255").eps == pytest.approx(8 / 255)
    assert pgd.Config().step_size == pytest.approx(2 / 255) and pgd.Config().steps == 10
    for bad in ({"eps": "8/x"}, {"eps": -0.1}, {"trades": True, "norm": "L2"}, {"combine": "mean", "lam": 0.5},
                {"trades": True, "lam": 0.5}, {"lam": 1.5}, {"attack": "fgsm"}):
        with pytest.raises(ValueError):
            pgd.Config(**bad)
    with pytest.raises(ValueError, match="a Linf budget above 1 is no budget"):  # 8 meant as 8/255
        pgd.Config(eps=8)
    assert pgd.Config(eps=1).eps == 1 and pgd.Config(eps=8, norm="L2").eps == 8  # the whole box; an L2 radius


@pytest.mark.parametrize("settings,key", [({"trades": True}, "trades"), ({"combine": "mean"}, "combine")])
def test_per_sample_lambda_with_trades_or_mean_is_bad_input(settings, key):
    run = fake_run(None, pgd.Config(**settings), enabled=("condition", "pgd"))
    with pytest.raises(UsageError, match=rf"^t\.yaml: plugins\.pgd\.{key}: expected "):
        pgd.on_model(model=None, run=run)
    assert pgd.on_model(model=None, run=fake_run(None, pgd.Config(**settings))) is None


# --- end to end ------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_runs_reproduce_bitwise(tmp_path):
    cfg = {"seed": 3, "data": {"n_train": 128, "batch_size": 64, "image_size": 16},
           "train": {"val_examples": 100, "epochs": 1, "lr": 0.05},
           "plugins": {"pgd": {"lam": 0.5, "eps": 0.2, "step_size": 0.1, "steps": 2}},
           "evaluate": {"clean": {"n_examples": 64}, "pgd": {"n_examples": 64, "eps": 0.2, "steps": 2}}}
    a = normlab.run(cfg, out=tmp_path / "a", quiet=True)
    b = normlab.run(cfg, out=tmp_path / "b", quiet=True)
    assert a.history[0]["loss/adv"] > 0 and a.history[0]["loss/ce"] > 0
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.metrics == b.metrics and a.metrics["pgd/eps"] == 0.2
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
