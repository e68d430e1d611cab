"""OAT conditioning: dual BN routing, FiLM, lambda sampling and encoding, the lam knob, checkpoints."""

import copy
import json
import math
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import normlab
import normlab_condition as cond
from normlab import hookimpl
from normlab.context import Context, Routing
from normlab.data import Batch
from normlab.errors import UsageError
from normlab.layers import FiLM, NormAct, RoutedNorm, map_norms
from normlab_registry import PluginSpec, ResolutionError, resolve
from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeRun:
    """What the hooks read from a Run, without data or a run directory."""

    def __init__(self, seed=0, **settings):
        self.cfg = cond.Config(**settings)
        self.source = "oat.yaml"
        self.state = {}
        self.enabled = ["condition", "pgd"]
        self.config = types.SimpleNamespace(seed=seed, model=types.SimpleNamespace(name="resnet18"))

    def plugin_config(self, name):
        assert name == "condition"
        return self.cfg


def backbone(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=10)


def convert(model, run):
    """on_model then on_batch_norm on every norm layer, as the host does."""
    assert cond.on_model(model=model, run=run) is None
    return map_norms(model, lambda name, m: cond.on_batch_norm(name=name, module=m, model=model, run=run))


def step_ctx(run, x, y):
    ctx = Context(run=run, training=True)
    batch = cond.on_batch(batch=Batch(x, y), ctx=ctx)
    return ctx, batch


def bn_state(model, route=None):
    """Running statistics of every BN, keyed by the plain model's layer name (route branch stripped)."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        if route is not None:
            if f".routes.{route}" not in name:
                continue
            name = name.replace(f".norm.routes.{route}", "")
        out[name] = (m.running_mean.clone(), m.running_var.clone())
    return out


def randomize_film(model, scale=0.3):
    """Give every FiLM non-zero last layers, so that it is no longer the identity."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FiLM):
                for mlp in (m.scale, m.shift):
                    mlp[2].weight.copy_(torch.randn(mlp[2].weight.shape, generator=g) * scale)
                    mlp[2].bias.copy_(torch.randn(mlp[2].bias.shape, generator=g) * scale)


# --- structure ------------------------------------------------------------------

def test_every_bn_becomes_a_routed_pair_with_film_and_keys_are_stable():
    model, run = backbone(), FakeRun()
    n = convert(model, run)
    layers = [m for m in model.modules() if isinstance(m, NormAct)]
    assert n == len(layers) == 20
    for layer in layers:
        assert isinstance(layer.norm, RoutedNorm) and layer.norm.names == ("clean", "adv")
        assert isinstance(layer.film, FiLM) and layer.film.scale[0].in_features == 128
        assert layer.film.scale[2].out_features == layer.norm.routes[0].num_features
    keys = model.state_dict().keys()
    assert "layer1.0.bn1.norm.routes.adv.running_mean" not in keys  # ModuleList: index keys
    assert "layer1.0.bn1.norm.routes.1.running_mean" in keys and "layer1.0.bn1.film.scale.0.weight" in keys
    assert "condition_code.matrix" in keys and "condition_code.values" not in keys


@pytest.mark.parametrize("settings, routed, film", [({"dual_bn": False}, False, True),
                                                    ({"film": False}, True, False)])
def test_ablations_drop_one_half(settings, routed, film):
    model, run = backbone(), FakeRun(**settings)
    convert(model, run)
    layers = [m for m in model.modules() if isinstance(m, NormAct)]
    assert len(layers) == 20
    assert all(isinstance(m.norm, RoutedNorm) == routed and (m.film is not None) == film for m in layers)
    ctx, _ = step_ctx(run, torch.rand(12, 3, 32, 32), torch.zeros(12, dtype=torch.long))
    assert (ctx.condition is not None) == film
    assert isinstance(ctx.route, Routing) == routed and (ctx.adv_route == "adv") == routed


# --- numbers --------------------------------------------------------------------

def test_all_zero_lambda_equals_the_clean_bn_model_train_mode_statistics_included():
    plain = backbone().train()
    model, run = copy.deepcopy(plain), FakeRun(zero_fraction=1.0, film=False)
    convert(model, run)
    model.train()
    adv_before = bn_state(model, "1")
    x, y = torch.rand(16, 3, 32, 32), torch.randint(10, (16,))
    ctx, _ = step_ctx(run, x, y)
    assert ctx.lam.eq(0).all() and ctx.route.counts == [16, 0]
    with ctx.active():
        out = model(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    clean, ref_stats = bn_state(model, "0"), bn_state(plain)
    assert clean.keys() == ref_stats.keys() and len(clean) == 20
    for k in ref_stats:
        assert torch.equal(clean[k][0], ref_stats[k][0]) and torch.equal(clean[k][1], ref_stats[k][1])
    for k, (mean, var) in bn_state(model, "1").items():  # the adversarial BNs saw nothing
        assert torch.equal(mean, adv_before[k][0]) and torch.equal(var, adv_before[k][1])


def test_all_zero_lambda_with_identity_film_equals_the_plain_model_end_to_end():
    plain = backbone().train()
    model, run = copy.deepcopy(plain), FakeRun(zero_fraction=1.0)
    convert(model, run)
    model.train()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(10, (16,))
    ctx, _ = step_ctx(run, x, y)
    assert ctx.condition.shape == (16, 128)
    with ctx.active():
        out = model(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    for k, (mean, var) in bn_state(plain).items():
        assert torch.equal(bn_state(model, "0")[k][0], mean) and torch.equal(bn_state(model, "0")[k][1], var)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_film_at_identity_initialisation_leaves_outputs_unchanged(mode):
    plain = backbone()
    with torch.no_grad():  # non-trivial statistics for eval mode
        plain.train()
        plain(torch.rand(32, 3, 32, 32))
    model, run = copy.deepcopy(plain), FakeRun(dual_bn=False)
    convert(model, run)
    plain.train(mode == "train"), model.train(mode == "train")
    x = torch.rand(12, 3, 32, 32)
    ctx, _ = step_ctx(run, x, torch.zeros(12, dtype=torch.long))
    assert ctx.condition.abs().sum() > 0 and len(set(ctx.lam.tolist())) > 2
    with torch.no_grad(), ctx.active():
        out = model(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    randomize_film(model)  # and it is live once trained
    with torch.no_grad(), ctx.active():
        assert (model(x) - out).abs().max() > 1e-3


def test_routing_equals_per_route_bn_on_sub_batches_with_per_sample_film():
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    run = FakeRun(dim=16)
    cond.on_model(model=nn.Sequential(bn), run=run)
    layer = cond.on_batch_norm(name="0", module=bn, model=None, run=run)
    randomize_film(layer)
    ref_clean, ref_adv = copy.deepcopy(layer.norm.routes[0]), copy.deepcopy(layer.norm.routes[1])
    ref_film = FiLM(8, 16)
    ref_film.load_state_dict(layer.film.state_dict())
    x = torch.randn(24, 8, 5, 5)
    ctx, _ = step_ctx(run, x, torch.zeros(24, dtype=torch.long))
    n0 = math.ceil(24 / 6)
    assert ctx.route.counts == [n0, 24 - n0] and ctx.route.perm is None  # contiguous: views, no gather
    with ctx.active():
        out = layer(x)
    normed = torch.cat([ref_clean(x[:n0]), ref_adv(x[n0:])])
    with Context(condition=ctx.condition).active():
        expected = ref_film(normed)  # the host FiLM, one MLP evaluation per row
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, ref in ((layer.norm.routes[0], ref_clean), (layer.norm.routes[1], ref_adv)):
        torch.testing.assert_close(got.running_mean, ref.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(got.running_var, ref.running_var, rtol=0, atol=0)


def test_film_on_distinct_rows_matches_the_per_row_formula_values_and_gradients():
    torch.manual_seed(4)
    film = FiLM(8, 16, 12)
    randomize_film(film)
    table = torch.randn(4, 16)
    c = table[torch.tensor([0, 0, 1, 2, 3, 3, 1, 2, 0, 3])]
    x = torch.randn(10, 8, 3, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ctx = Context(condition=c)
    with ctx.active():
        out = film(x)
        out2 = film(x)  # cached distinct rows
    assert ctx.state["film.rows"][2].shape == (4, 16)
    ref = copy.deepcopy(film)
    expected = x_ref * (1 + ref.scale(c))[:, :, None, None] + ref.shift(c)[:, :, None, None]  # every row
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2, expected, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(expected)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(film.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad(), Context(condition=c[:1]).active():  # one row: the knob broadcast
        one = x.detach() * (1 + ref.scale(c[:1]))[:, :, None, None] + ref.shift(c[:1])[:, :, None, None]
        torch.testing.assert_close(film(x.detach()), one, rtol=1e-5, atol=1e-6)


def test_fused_eval_bn_film_equals_norm_then_film_and_its_cache_follows_changes():
    torch.manual_seed(6)
    model, run = backbone(), FakeRun()
    convert(model, run)
    randomize_film(model)
    with torch.no_grad():  # non-trivial statistics and affine parameters on both routes
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, cond.CondNormAct)]
    assert len(layers) == 20
    code = run.state["condition"]
    x = torch.rand(9, 3, 32, 32)
    for route, cond_rows in (("adv", code.table[torch.tensor([1, 2, 5, 5, 3, 1, 4, 2, 5])]),
                             ("clean", code.table[:1]), ("adv", code.encode(0.7))):
        ctx = Context(run=run, route=route, condition=cond_rows)
        xi = x.clone().requires_grad_(True)
        with ctx.active():
            out = model(xi)
            out.sum().backward()
        generic = _unfused(model)
        xr = x.clone().requires_grad_(True)
        with ctx.active():
            ref = generic(xr)
            ref.sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-4, atol=1e-6)
    # parameters off (an attack): the coefficients are cached and follow in-place changes
    for p in model.parameters():
        p.requires_grad_(False)
    ctx = Context(run=run, route="adv", condition=code.table[torch.tensor([1, 5, 5])])
    with torch.no_grad(), ctx.active():
        first = model(x[:3])
        assert layers[0].__dict__["_fused_cache"] is not None
        with torch.no_grad():
            layers[0].film.shift[2].bias.add_(0.5)  # an optimizer step changes parameters in place
            layers[0].norm.routes[1].running_mean.add_(0.2)
        changed = model(x[:3])
        ref = _unfused(model)(x[:3])
    assert (changed - first).abs().max() > 1e-3
    torch.testing.assert_close(changed, ref, rtol=1e-4, atol=1e-5)


def _unfused(model):
    """A copy whose norm layers run norm, FiLM, drop and act one after the other (NormAct's forward)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, cond.CondNormAct):
            m.forward = types.MethodType(NormAct.forward, m)
    return ref


# --- the encoding ----------------------------------------------------------------

def test_orthogonal_matrix_from_the_seed_and_safetensors_round_trip_bit_for_bit(tmp_path):
    model, run = backbone(), FakeRun(seed=7)
    convert(model, run)
    m = model.condition_code.matrix
    assert m.shape == (128, 128) and m.dtype == torch.float32
    torch.testing.assert_close(m @ m.T, torch.eye(128), rtol=0, atol=1e-5)
    assert torch.equal(m, cond.random_orthogonal(128, 7)) and not torch.equal(m, cond.random_orthogonal(128, 8))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    other, run2 = backbone(), FakeRun(seed=8)
    convert(other, run2)
    other.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert torch.equal(other.condition_code.matrix, m)
    assert run2.state["condition"] is other.condition_code  # the hooks read the loaded buffer


def test_encoding_rows_interpolation_and_the_other_encodings():
    code = cond.LambdaCode(cond.Config(), seed=0)
    e = {c: code.table[k] for k, c in enumerate(code.choices)}
    for c in code.choices:
        assert torch.equal(code.encode(c)[0], e[c])
    torch.testing.assert_close(code.encode(0.05)[0], 0.5 * e[0.0] + 0.5 * e[0.1])
    torch.testing.assert_close(code.encode(0.25)[0], 0.5 * e[0.2] + 0.5 * e[0.3])
    torch.testing.assert_close(code.encode(0.85)[0], 0.25 * e[0.4] + 0.75 * e[1.0])
    assert code.encode(0.7).shape == (1, 128)
    high = cond.LambdaCode(cond.Config(choices=[0.2, 0.5, 0.0]), seed=0)  # any order; outside: nearest end
    assert torch.equal(high.encode(0.9)[0], high.table[1])
    torch.testing.assert_close(high.encode(0.1)[0], 0.5 * high.table[2] + 0.5 * high.table[0])
    onehot = cond.LambdaCode(cond.Config(encoding="onehot"), seed=0)
    assert torch.equal(onehot.table, torch.eye(6))
    torch.testing.assert_close(onehot.encode(0.7)[0], torch.tensor([0, 0, 0, 0, 0.5, 0.5]))
    scalar = cond.LambdaCode(cond.Config(encoding="scalar"), seed=0)
    torch.testing.assert_close(scalar.encode(0.7), torch.tensor([[0.7]]))
    assert cond.Config(encoding="onehot").code_dim == 6 and cond.Config(encoding="scalar").code_dim == 1


# --- sampling --------------------------------------------------------------------

def test_fixed_sampling_zero_count_zeros_first_and_values():
    cfg = cond.Config()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for n in (128, 100, 7):
        idx, perm = cond.sample_indices(n, cfg, g)
        assert perm is None and idx.shape == (n,)
        n0 = math.ceil(n / 6)  # 22 of 128, as the public code
        assert idx[:n0].eq(0).all() and idx[n0:].ne(0).all()
    for _ in range(200):
        idx, _ = cond.sample_indices(128, cfg, g)
        counts += torch.bincount(idx, minlength=6)
    assert counts[0] == 200 * 22
    share = counts[1:] / counts[1:].sum()  # the nonzero choices uniformly: 0.2 each, 21,200 draws
    assert (share - 0.2).abs().max() < 0.015
    idx, _ = cond.sample_indices(50, cond.Config(zero_fraction=0.5), g)
    assert idx[:25].eq(0).all() and idx[25:].ne(0).all()


def test_iid_sampling_fraction_and_batch_permuted_consistently():
    cfg = cond.Config(sampling="iid", zero_fraction=0.25)
    g = torch.Generator().manual_seed(1)
    zeros = 0
    for _ in range(100):
        idx, perm = cond.sample_indices(128, cfg, g)
        k = int(idx.eq(0).sum())
        assert idx[:k].eq(0).all() and idx[k:].ne(0).all()
        assert torch.equal(perm.sort().values, torch.arange(128))
        zeros += k
    assert abs(zeros / 12800 - 0.25) < 0.02
    run = FakeRun(sampling="iid")
    cond.on_model(model=backbone(), run=run)
    y = torch.arange(64) % 10
    x = y.float()[:, None, None, None].expand(64, 3, 4, 4).clone()  # the label is written into the image
    ctx, batch = step_ctx(run, x, y)
    assert torch.equal(batch.x[:, 0, 0, 0].long(), batch.y)
    assert sorted(batch.y.tolist()) == sorted(y.tolist())
    k = int(ctx.lam.eq(0).sum())
    assert ctx.lam[:k].eq(0).all() and ctx.lam[k:].ne(0).all() and ctx.route.perm is None


def test_context_fields_reach_a_loss_plugin_and_subset_keeps_them_aligned():
    model, run = backbone(), FakeRun()
    convert(model, run)
    randomize_film(model)
    model.train()
    x, y = torch.rand(12, 3, 32, 32), torch.randint(10, (12,))
    ctx, _ = step_ctx(run, x, y)
    assert ctx.lam.shape == (12,) and set(ctx.lam.tolist()) <= set(torch.tensor(run.cfg.choices).tolist())
    rows = {round(c, 6): k for k, c in enumerate(run.cfg.choices)}
    for lam, row in zip(ctx.lam.tolist(), ctx.condition):
        assert torch.equal(row, model.condition_code.table[rows[round(lam, 6)]])
    mask = ctx.lam != 0
    sub = ctx.subset(mask)
    assert torch.equal(sub.lam, ctx.lam[mask]) and torch.equal(sub.condition, ctx.condition[mask])
    with torch.no_grad(), sub.using(route=ctx.adv_route):  # what pgd does for the adversarial forward
        adv_logits = model(x[mask])
    with torch.no_grad(), ctx.active():
        all_logits = model(x)
    # the lambda != 0 rows ran through the adversarial BNs in the full batch too (same rows, same BN)
    torch.testing.assert_close(adv_logits, all_logits[mask], rtol=1e-4, atol=1e-5)


# --- the knob --------------------------------------------------------------------

def test_on_domain_sets_and_restores_lam_condition_route():
    model, run = backbone(), FakeRun(lam=0.3)
    convert(model, run)
    ctx = Context(run=run)
    undo = cond.on_domain(model=model, domain="clean", samples=None, ctx=ctx)
    assert ctx.lam.tolist() == [pytest.approx(0.3)] and ctx.route == "adv"
    assert torch.equal(ctx.condition, model.condition_code.table[3][None])
    undo()
    assert ctx.lam is None and ctx.condition is None and ctx.route is None
    swept = Context(run=run, lam=torch.tensor([0.0]))  # a sweep's value wins over the configured one
    undo = cond.on_domain(model=model, domain="clean", samples=None, ctx=swept)
    assert swept.route == "clean" and torch.equal(swept.condition, model.condition_code.table[0][None])
    undo()
    assert swept.lam.tolist() == [0.0] and swept.route is None
    unseen = Context(run=run, lam=torch.tensor([0.05]))
    cond.on_domain(model=model, domain="style/invert", samples=None, ctx=unseen)
    assert unseen.route == "adv"
    torch.testing.assert_close(unseen.condition[0], model.condition_code.encode(0.05)[0])
    x = torch.rand(5, 3, 32, 32)
    model.eval()
    randomize_film(model)
    with torch.no_grad(), unseen.active():  # the one-row knob broadcast over any batch
        out = model(x)
    with torch.no_grad(), Context(route="adv", condition=unseen.condition.expand(5, -1)).active():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


# --- bad input and registry --------------------------------------------------------

def test_config_errors():
    for bad in ({"choices": [0, 1.5]}, {"choices": [0, 0.1, 0.1]}, {"zero_fraction": 0.2, "choices": [0.5, 1]},
                {"choices": [0], "zero_fraction": 0.5}, {"dim": 4}, {"lam": 2}, {"sampling": "batch"},
                {"encodng": "onehot"}):
        with pytest.raises(ValueError):
            cond.Config(**bad)
    assert cond.Config(choices=[0.5, 1]).zeros == 0 and cond.Config().zeros == pytest.approx(1 / 6)


def test_backbone_without_bn_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^oat.yaml: plugins.condition.dual_bn: expected a backbone with "
                                         r"BatchNorm layers; Sequential \(resnet18\) has none$"):
        cond.on_model(model=nn.Sequential(nn.Conv2d(3, 4, 3)), run=FakeRun())


def test_registry_declares_requires_conflicts_and_knob():
    spec = PluginSpec("condition", requires=cond.requires, conflicts=cond.conflicts,
                      extra={"conflict_reasons": cond.conflict_reasons})
    specs = {"condition": spec, "pgd": PluginSpec("pgd", after=("condition",)), "nf": PluginSpec("nf"),
             "advbn": PluginSpec("advbn")}
    assert resolve(["condition", "pgd"], specs) == ["condition", "pgd"]
    with pytest.raises(ResolutionError, match="requires plugin 'pgd'"):
        resolve(["condition"], specs)
    with pytest.raises(ResolutionError, match="no BN to duplicate"):
        resolve(["nf", "condition", "pgd"], specs)
    with pytest.raises(ResolutionError, match="one field cannot hold two"):
        resolve(["condition", "pgd", "advbn"], specs)
    assert cond.knobs == ("lam",)


# --- through the host ------------------------------------------------------------------

class StubPGD:
    """Stands in for normlab-pgd where it is not needed: records what it reads from the context."""

    after = ("condition",)

    def __init__(self):
        self.seen = []

    @hookimpl
    def on_loss(self, batch, model, ctx, terms):
        self.seen.append((ctx.lam.clone(), ctx.adv_route, ctx.route.counts))


@pytest.mark.slow
def test_host_run_checkpoint_holds_the_matrix_and_eval_reloads_it(tmp_path):
    stub = StubPGD()
    cfg = {"seed": 3, "model": {"name": TINY_MODEL}, "data": {"name": "mnist", "batch_size": 32, "n_train": 64},
           "train": {"val_examples": 100, "epochs": 1, "lr": 0.05}, "plugins": {"condition": {}, "pgd": {}},
           "evaluate": {"clean": {"n_examples": 64}}}
    res = normlab.run(cfg, out=tmp_path / "run", plugins={"pgd": stub}, quiet=True)
    assert len(stub.seen) == 2
    lam, adv_route, counts = stub.seen[0]
    assert adv_route == "adv" and counts == [6, 26] and lam[:6].eq(0).all() and lam[6:].ne(0).all()
    saved = load_file(str(next((tmp_path / "run" / "checkpoints").glob("epoch-*/model.safetensors"))))
    matrix = saved["backbone.condition_code.matrix"]
    assert torch.equal(matrix, cond.random_orthogonal(128, 3))
    again = normlab.evaluate(res.dir, overrides=["seed=11"], plugins={"pgd": StubPGD()}, quiet=True)
    assert torch.equal(again.model.backbone.condition_code.matrix.cpu(), matrix)  # from the checkpoint
    assert again.metrics["clean/acc"] == res.metrics["clean/acc"]
    assert json.loads((res.dir / "results.json").read_text())["plugins"]["condition"] == "0.1.0"


@pytest.mark.slow
def test_oat_with_the_real_pgd_plugin_trains_and_sweeps_lam(tmp_path):
    pytest.importorskip("normlab_pgd")
    cfg = {"seed": 0, "model": {"name": TINY_MODEL}, "data": {"name": "mnist", "batch_size": 64, "n_train": 128},
           "train": {"val_examples": 100, "epochs": 1, "lr": 0.05},
           "plugins": {"condition": {}, "pgd": {"eps": 0.2, "step_size": 0.1, "steps": 2}},
           "evaluate": {"sweep": {"knob": "lam", "values": [0.0, 0.05, 1.0],
                                  "evaluators": {"clean": {"n_examples": 64},
                                                 "pgd": {"eps": 0.2, "steps": 2, "alpha": 0.1, "n_examples": 64}}}}}
    res = normlab.run(cfg, out=tmp_path / "run", quiet=True)
    assert res.history[0]["loss/adv"] > 0 and "loss/ce" in res.history[0]
    for v in ("0.0", "0.05", "1.0"):
        assert 0 <= res.metrics[f"sweep/lam={v}/pgd/acc"] <= res.metrics[f"sweep/lam={v}/clean/acc"]
    assert (res.dir / "plots" / "sweep_lam.png").is_file()
    # each sweep point is the plain evaluation with the knob set in the run file
    for v in ("0.0", "1.0"):
        fixed = normlab.evaluate(res.dir, overrides=[f"plugins.condition.lam={v}", "evaluate={clean: {n_examples: 64}, "
                                 "pgd: {eps: 0.2, steps: 2, alpha: 0.1, n_examples: 64}}"], name=f"lam{v}", quiet=True)
        assert fixed.metrics[f"lam{v}/clean/acc"] == res.metrics[f"sweep/lam={v}/clean/acc"]
        assert fixed.metrics[f"lam{v}/pgd/acc"] == res.metrics[f"sweep/lam={v}/pgd/acc"]


# --- FiLM as the OAT code has it (film_style: oat) --------------------------------

def test_oat_film_sits_after_stem_and_block_bns_only_with_one_mlp_d_2c_2c():
    model, run = backbone(), FakeRun(film_style="oat")
    assert cond.Config().film_style == "normlab"  # the default: it trained far better (module docstring)
    convert(model, run)
    films = {n: m for n, m in model.named_modules() if isinstance(m, FiLM)}
    routed = [n for n, m in model.named_modules() if isinstance(m, RoutedNorm)]
    assert len(routed) == 20 and len(films) == 17  # 20 BNs, 3 of them projection shortcuts
    assert not any(".downsample." in n for n in films) and "bn1.film" in films
    film = films["layer2.0.bn1.film"]  # 128 channels
    assert [type(m) for m in film.mlp] == [nn.Linear, nn.LeakyReLU, nn.Linear]
    assert (film.mlp[0].in_features, film.mlp[0].out_features, film.mlp[2].out_features) == (128, 256, 256)


def test_oat_film_equals_the_papers_code_formula_and_the_fused_eval_path():
    torch.manual_seed(7)
    film = FiLM(8, 16, style="oat")
    x, c = torch.randn(4, 8, 5, 5), torch.randn(4, 16)
    h = F.leaky_relu(c @ film.mlp[0].weight.T + film.mlp[0].bias)
    out = h @ film.mlp[2].weight.T + film.mlp[2].bias
    mu, sigma = F.leaky_relu(out[:, :8]), F.leaky_relu(out[:, 8:])
    with Context(condition=c).active():
        torch.testing.assert_close(film(x), x * mu[:, :, None, None] + sigma[:, :, None, None])
    # fused BN + FiLM in eval mode equals BN then FiLM, for the oat form too
    model, run = backbone(), FakeRun(film_style="oat")
    convert(model, run)
    model.eval()
    code = run.state["condition"]
    ctx = Context(run=run, route="adv", condition=code.table[torch.tensor([1, 2, 5])])
    xi = torch.rand(3, 3, 32, 32)
    with torch.no_grad(), ctx.active():
        torch.testing.assert_close(model(xi), _unfused(model)(xi), rtol=1e-4, atol=1e-5)


def test_iid_sampling_with_augmix_is_refused_before_anything_is_written(tmp_path, write_yaml, capsys):
    """iid sampling moves each batch's lambda-0 rows to the front, which would scatter AugMix's clean rows
    and views (measured: 11 of the 16 rows taken as clean were clean): a usage error, exit 2."""
    from normlab.cli import main

    path = write_yaml({"data": {"n_train": 32, "batch_size": 16, "image_size": 16}, "train": {"epochs": 1},
                       "plugins": {"augmix": {"workers": 0}, "condition": {"sampling": "iid"}, "pgd": {"steps": 1}}})
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "plugins.condition.sampling: expected 'fixed' with augmix" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
