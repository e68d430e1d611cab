"""AdvBN: the feature attack's math, what trains, the route knob, families, and errors."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab_advbn as advbn
from normlab.cli import main
from normlab.config import parse_run
from normlab.context import Context
from normlab.data import Batch
from normlab.layers import Split
from normlab.runner import prepare
from normlab.train import LossTerms
from normlab_registry import PluginSpec, ResolutionError, resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def build(model="resnet18", batch_size=16, **plugin):
    """A run built by the host (hooks applied, front frozen), not trained."""
    cfg = parse_run({"seed": 0, "model": {"name": model}, "data": {"batch_size": batch_size},
                     "train": {"val_examples": 100, "device": "cpu", "epochs": 1}, "plugins": {"advbn": plugin},
                     "evaluate": {}}, "test.yaml")
    run = prepare(cfg, "test.yaml", quiet=True)
    run.build()
    run.trainable_parameters()
    return run


def batch(run, n=16, seed=0):
    x, y = next(iter(run.data.loader("train", n, seed=seed)))
    return Batch(x, y)


def host_step(run, b):
    """One training step's forward and loss terms as the host computes them (train.py)."""
    run.train_mode()
    ctx = Context(run=run, training=True)
    with ctx.active():
        b.logits = run.model(b.x)
        terms = LossTerms()
        terms.add("ce", F.cross_entropy(b.logits, b.y, reduction="none"))
        run.hooks.call("on_loss", batch=b, model=run.model, ctx=ctx, terms=terms)
    return ctx, terms


def bn_snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- the math ------------------------------------------------------------------------------------------

def _tail_and_feature(name="resnet18", layer="layer1", n=16):
    run = build(name, layer=layer)
    split = Split(run.model, layer)
    x, y = batch(run, n).x, batch(run, n).y
    run.model.eval()
    with torch.no_grad():
        f = split.front(x)
    return run, split, f, y


def test_eps_zero_leaves_the_features_unchanged():
    run, split, f, y = _tail_and_feature()
    mu, ds, dm = advbn.attack(split.tail, f, y, steps=3, step_size=0.2, eps=0.0, clamp=True)
    assert torch.equal(ds, torch.ones_like(ds)) and torch.equal(dm, torch.ones_like(dm))
    torch.testing.assert_close(advbn.perturb(f, mu, ds, dm, True), f, rtol=0, atol=1e-6)
    torch.testing.assert_close(mu.flatten(), f.mean(dim=(0, 2, 3)))  # statistics over the whole batch


def test_one_step_is_the_clipped_sign_of_the_chain_rule_gradient():
    run, split, f, y = _tail_and_feature()
    mu, ds, dm = advbn.attack(split.tail, f, y, steps=1, step_size=0.3, eps=0.25, clamp=False)
    # independent: the gradient w.r.t. the features, then the chain rule by hand
    fa = f.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(split.tail(fa), y), fa)
    centred = f - f.mean(dim=(0, 2, 3), keepdim=True)
    g_sigma = (g * centred).sum(dim=(0, 2, 3))
    g_mu = (g * f.mean(dim=(0, 2, 3), keepdim=True)).sum(dim=(0, 2, 3))
    assert (g_sigma != 0).all() and (g_mu != 0).all()
    torch.testing.assert_close(ds.flatten(), 1 + 0.25 * g_sigma.sign())  # 0.3 clipped to eps 0.25
    torch.testing.assert_close(dm.flatten(), 1 + 0.25 * g_mu.sign())


def test_the_attack_raises_the_loss_and_stays_in_the_box():
    run, split, f, y = _tail_and_feature()
    ctx = Context(run=run)
    with torch.no_grad(), ctx.using(route="aux"):
        clean = F.cross_entropy(split.tail(f), y).item()
    f_adv = advbn.adversarial_features(run.model, split, f, y, advbn.Config(), True, ctx)
    with torch.no_grad(), ctx.using(route="aux"):
        adv = F.cross_entropy(split.tail(f_adv), y).item()
    assert adv > clean, (clean, adv)
    assert f_adv.min() >= 0 and not torch.equal(f_adv, f)
    assert not run.model.training  # attack_mode restored the mode it found
    assert all(p.requires_grad for p in split.tail_parameters()) and not any(
        p.requires_grad for p in split.front_parameters())


@pytest.mark.parametrize("name,layer,relu", [("resnet18", "layer1", True), ("efficientnet_b0", "blocks.1", False)])
def test_clamp_at_zero_only_after_a_relu(name, layer, relu):
    run = build(name, layer=layer, steps=2)
    b = batch(run)
    ctx, terms = host_step(run, b)
    assert run.state["advbn"]["clamp"] is relu
    f = ctx.state["advbn"]
    assert bool(f.min() >= 0) is relu
    split = Split(run.model, layer)
    run.model.eval()
    f_adv = advbn.adversarial_features(run.model, split, f, b.y, advbn.Config(eps=1.5, steps=3), relu, ctx)
    unclamped = advbn.perturb(f, f.mean(dim=(0, 2, 3), keepdim=True), torch.full_like(f[:1, :, :1, :1], -0.5),
                              torch.ones_like(f[:1, :, :1, :1]), False)
    assert unclamped.min() < 0  # the formula itself goes negative
    assert bool(f_adv.min() >= 0) is relu  # clamped after ReLU; EfficientNet's residual output is not


# --- the host path: families, exact split, once-run front ----------------------------------------------------

@pytest.mark.parametrize("name,layer", [("resnet18", "layer1"), ("densenet121", "features.denseblock1"),
                                        ("efficientnet_b0", "blocks.1"), ("regnetx_002", "s1")])
def test_families_split_exactly_and_a_step_runs(name, layer):
    run = build(name, layer=layer, steps=2)
    model = run.model
    split = Split(model, layer)
    x = batch(run, 8).x
    model.eval()
    with torch.no_grad():
        whole = model(x)
        torch.testing.assert_close(split.tail(split.front(x)), whole, rtol=0, atol=0)
        with Context(route="aux").active():  # the aux BNs start as copies of the clean ones
            torch.testing.assert_close(model(x), whole, rtol=0, atol=0)
    norms = advbn.routed_norms(model)
    tail_bns = [n for n, m in model.backbone.named_modules()
                if isinstance(m, nn.BatchNorm2d) and advbn._under(n, split.tail_prefixes())]
    assert norms and len(tail_bns) == 2 * len(norms)  # every tail BN got a main and an aux copy
    assert all(not advbn._under(n.removeprefix("backbone."), split.front_names) for n, _ in norms)
    b = batch(run, 8)
    front_before = {n: v.clone() for n, v in model.state_dict().items() if advbn._under(
        n.removeprefix("backbone."), split.front_names)}
    ctx, terms = host_step(run, b)
    with torch.no_grad():
        torch.testing.assert_close(ctx.state["advbn"], split.front(b.x), rtol=0, atol=0)  # the kept f is g1(x)
    assert terms["advbn"].shape == (8,) and torch.isfinite(terms.total())
    terms.total().backward()
    assert all(p.grad is None for p in split.front_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in split.tail_parameters())
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in front_before.items())
    main_stats, aux_stats = zip(*[(m.routes[0].running_mean.clone(), m.routes[1].running_mean.clone())
                                  for _, m in norms])
    assert not all(torch.equal(a, b) for a, b in zip(main_stats, aux_stats))


def test_the_front_runs_once_per_step_and_only_the_tail_repeats():
    run = build(steps=4)
    calls = {"front": 0, "tail": 0}
    bb = run.model.backbone
    bb.conv1.register_forward_hook(lambda *a: calls.__setitem__("front", calls["front"] + 1))
    bb.layer4.register_forward_hook(lambda *a: calls.__setitem__("tail", calls["tail"] + 1))
    host_step(run, batch(run))
    assert calls == {"front": 1, "tail": 1 + 2 + 4 + 1}  # clean; the one-time fold check (plain, folded); ...
    calls.update(front=0, tail=0)
    host_step(run, batch(run, seed=1))
    assert calls == {"front": 1, "tail": 1 + 4 + 1}  # clean forward; 4 attack steps; adversarial forward


def test_samples_clean_perturbs_only_the_clean_rows():
    """With samples: clean the adversarial term is the clean rows' alone: other rows leave it unchanged,
    while the host's ce (whose train-mode BNs see the whole batch) and a change of the clean rows do not."""
    def terms_for(clean_seed, other_seed):
        run = build(steps=1, samples="clean")  # the same weights each time
        with torch.no_grad():  # timm zero-initialises each block's last BN scale: make outputs depend on inputs
            for m in run.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.fill_(1.0)
        b = batch(run, 12, seed=clean_seed)
        b.x[4:] = batch(run, 8, seed=other_seed).x  # the rows after the 4 clean ones
        b.extra["n_clean"] = 4
        return host_step(run, b)[1]

    base, others, clean = terms_for(0, 5), terms_for(0, 6), terms_for(1, 5)
    assert base["advbn"].shape == (4,) and base["ce"].shape == (12,)
    torch.testing.assert_close(base["advbn"], others["advbn"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base["ce"][:4], others["ce"][:4], rtol=1e-3, atol=1e-4)
    assert not torch.allclose(base["advbn"], clean["advbn"], rtol=1e-3, atol=1e-4)


# --- the route knob ---------------------------------------------------------------------------------------

def test_auto_picks_the_route_whose_statistics_match_the_domain():
    run = build()
    model = run.model.eval()
    x = batch(run, 64).x
    x = 0.5 * x + 0.5 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))  # a shifted domain
    ctx = Context(run=run)
    # give the aux route exactly this domain's statistics (one cumulative train-mode pass through aux)
    aux_bns = [m.routes[1] for _, m in advbn.routed_norms(model)]
    for bn in aux_bns:
        bn.reset_running_stats(), setattr(bn, "momentum", None), bn.train()
    with torch.no_grad(), ctx.using(route="aux"):
        model(x)
    for bn in aux_bns:
        bn.eval()
    divs = advbn.route_divergences(model, x, ctx)
    assert divs["aux"] < 1e-3 < divs["main"]
    cfg = run.plugin_config("advbn")
    cfg.route = "auto"
    undo = advbn.on_domain(model, "style/x", x, ctx)
    assert ctx.route == "aux" and run.state["advbn"]["auto"]["style/x"]["route"] == "aux"
    undo()
    assert ctx.route is None
    cfg.route = "main"
    sweep_ctx = Context(run=run, route="auto")  # a sweep's value wins over the config
    undo = advbn.on_domain(model, "clean", batch(run, 64).x, sweep_ctx)
    assert sweep_ctx.route == "main" and run.state["advbn"]["auto"]["clean"]["route"] == "main"
    undo()
    assert sweep_ctx.route == "auto"
    assert advbn.on_domain(model, "clean", x, Context(run=run, route="aux")) is None  # a fixed sweep value


# --- errors and registry ------------------------------------------------------------------------------------

def test_unknown_layer_exits_2_with_one_line_listing_the_valid_layers(tmp_path, write_yaml, capsys):
    path = write_yaml({"model": {"name": "resnet18"}, "train": {"epochs": 0}, "plugins": {"advbn": {"layer": "layer9"}},
                       "evaluate": {}})
    code = main(["run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.endswith("run.yaml: plugins.advbn.layer: expected one of conv1, bn1, act1, maxpool, layer1, layer2, "
                        "layer3, layer4; got 'layer9'"), err
    assert not (tmp_path / "out").exists()


def test_registry_declares_conflicts_and_the_route_knob():
    spec = PluginSpec("advbn", conflicts=advbn.conflicts, extra={"conflict_reasons": advbn.conflict_reasons})
    with pytest.raises(ResolutionError, match="nf removes every BN, so there is no auxiliary BN"):
        resolve(["advbn", "nf"], {"advbn": spec, "nf": PluginSpec("nf")})
    assert advbn.knobs == ("route",) and advbn.ROUTES == ("main", "aux")


# --- end to end ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fine_tune_trains_only_the_tail_and_the_route_knob_evaluates(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=10)
    base.train()
    with torch.no_grad():  # non-trivial BN statistics in the checkpoint
        for _ in range(2):
            base(torch.randn(16, 3, 32, 32))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    cfg = {"seed": 0, "model": {"name": "resnet18", "checkpoint": str(tmp_path / "base.pt")},
           "data": {"n_train": 128, "batch_size": 64},
           "train": {"val_examples": 100, "epochs": 1, "lr": 0.05, "device": "cpu"},
           "plugins": {"advbn": {"steps": 2}},
           "evaluate": {"clean": {"n_examples": 128},
                        "sweep": {"knob": "route", "values": ["main", "aux", "auto"],
                                  "evaluators": {"clean": {"n_examples": 128}}}}}
    res = normlab.run(cfg, out=tmp_path / "run", quiet=True)
    after = res.model.backbone.state_dict()
    before = base.state_dict()
    front = ("conv1.", "bn1.", "layer1.")
    for k, v in before.items():
        if k.startswith(front):  # parameters and BN statistics of the front, bitwise
            assert torch.equal(after[k], v), k
    tail = [k for k in before if k.endswith("weight") and not k.startswith(front)]
    routed = lambda k: k if k in after else k.replace(".weight", ".norm.routes.0.weight")  # noqa: E731
    changed = [k for k in tail if not torch.equal(after[routed(k)], before[k])]
    assert len(changed) == len(tail)  # every tail weight trained
    mains = [k for k in after if ".norm.routes.0.running_mean" in k]
    assert len(mains) == 15 and all(k.startswith(("layer2", "layer3", "layer4")) for k in mains)
    assert all(not torch.equal(after[k], after[k.replace("routes.0", "routes.1")]) for k in mains)
    m = res.metrics
    assert m["sweep/route=main/clean/acc"] == m["clean/acc"]  # the config's route is main
    assert "advbn/auto/agrees_with_best" in m or m["sweep/route=main/clean/acc"] == m["sweep/route=aux/clean/acc"]
    again = normlab.evaluate(res.dir, overrides=["plugins.advbn.route=aux"], name="aux", quiet=True)
    assert again.metrics["aux/clean/acc"] == m["sweep/route=aux/clean/acc"]  # reloads the routed checkpoint
    rec = json.loads((res.dir / "results.json").read_text())["records"]["advbn"]["domains"]
    assert rec["clean"]["route"] in ("main", "aux") and rec["clean"]["divergence_main"] > 0
