"""The slim plugin (slimmable widths, switchable BN) and OATS (slim + condition + pgd): the numbers."""

import copy
import dataclasses
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import normlab
import normlab_slim as slim
from normlab import hookimpl
from normlab.cli import main
from normlab.config import parse_run
from normlab.context import Context
from normlab.errors import UsageError
from normlab.layers import map_norms
from normlab.runner import prepare
from normlab.train import LossTerms

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeRun:
    def __init__(self, **settings):
        self.cfg = slim.Config(**settings)
        self.source = "slim.yaml"
        self.state = {}
        self.config = types.SimpleNamespace(seed=0, model=types.SimpleNamespace(name="resnet18"))

    def plugin_config(self, name):
        assert name == "slim"
        return self.cfg


def slimmed(model, **settings):
    run = FakeRun(**settings)
    assert slim.on_model(model=model, run=run) is None
    map_norms(model, lambda name, m: slim.on_batch_norm(name=name, module=m, model=model, run=run))
    return model


def randomize_bns(model, seed=0):
    """Non-trivial BN parameters and statistics, so that slicing mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (1.0 if t is m.weight else 0.0))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def at(width, fn):
    with Context(width=width).active():
        return fn()


# --- layers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet26"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_full_width_is_the_unmodified_model_bit_for_bit(name, mode):
    torch.manual_seed(0)
    plain = randomize_bns(timm.create_model(name, num_classes=10))
    model = slimmed(copy.deepcopy(plain))
    getattr(plain, mode)(), getattr(model, mode)()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(at(None, lambda: model(x)), plain(x))
    assert torch.equal(at(1.0, lambda: model(x)), plain(x))


def test_a_half_width_conv_is_a_plain_conv_of_the_first_filters():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, bias=True)
    s = slim.SlimConv2d.of(conv, 1.0)
    assert s.weight is conv.weight and list(s.state_dict()) == list(conv.state_dict())
    plain = nn.Conv2d(4, 3, 3, padding=1, bias=True)
    with torch.no_grad():
        plain.weight.copy_(conv.weight[:3, :4])
        plain.bias.copy_(conv.bias[:3])
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(at(0.5, lambda: s(x)), plain(x), atol=1e-6)
    assert slim.channels(64, 0.75) == 48 and slim.channels(3, 0.1) == 1


@pytest.mark.parametrize("block, layers", [(BasicBlock, (2, 2, 2, 2)), (Bottleneck, (2, 2, 2, 2))])
def test_half_width_network_equals_the_dedicated_half_network_with_sliced_weights(block, layers):
    """The whole slimmed network at 0.5 is timm's ResNet built with half the channels, from the first ones."""
    torch.manual_seed(0)
    full = randomize_bns(ResNet(block, layers, num_classes=10, stem_type="deep", stem_width=32))  # resnet*d stem
    half = ResNet(block, layers, num_classes=10, channels=(32, 64, 128, 256), stem_type="deep", stem_width=16)
    half.load_state_dict({k: full.state_dict()[k][tuple(slice(0, n) for n in v.shape)]
                          for k, v in half.state_dict().items()})
    model = slimmed(copy.deepcopy(full)).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(at(0.5, lambda: model(x)), half.eval()(x), atol=1e-5)
    with FlopCounterMode(display=False) as counter:
        half(x[:1])
    assert slim.flops(model, x[:1], Context(), 0.5) == counter.get_total_flops()  # the dedicated network's
    with FlopCounterMode(display=False) as counter:
        full.eval()(x[:1])
    assert slim.flops(model, x[:1], Context(), 1.0) == counter.get_total_flops()


def test_switchable_bns_per_width_and_the_same_tree_in_either_order_with_condition():
    import normlab_condition as cond

    crun = types.SimpleNamespace(cfg=cond.Config(), source="x.yaml", state={},
                                 config=types.SimpleNamespace(seed=0, model=types.SimpleNamespace(name="resnet18")))
    crun.plugin_config = lambda name: crun.cfg
    srun = FakeRun()
    trees = []
    for order in (("slim", "condition"), ("condition", "slim")):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=10)
        slim.on_model(model=model, run=srun)
        cond.on_model(model=model, run=crun)

        def both(name, m, model=model, order=order):
            for p in order:
                m = (slim if p == "slim" else cond).on_batch_norm(name=name, module=m, model=model,
                                                                  run=srun if p == "slim" else crun)
            return m
        map_norms(model, both)
        trees.append({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert trees[0] == trees[1]
    assert trees[0]["layer1.0.bn1.norm.routes.1.routes.2.running_mean"] == (32,)  # adv route, width 0.5
    assert trees[0]["layer1.0.bn1.norm.routes.0.routes.0.weight"] == (64,)


@pytest.mark.parametrize("name, message", [
    ("efficientnet_b0", "supports timm's ResNet family"),
    ("resnext26ts", "supports timm's ResNet family"),
    ("resnext50_32x4d", "groups=32"),
])
def test_unsupported_models_are_refused_naming_what_is_supported(name, message):
    model = timm.create_model(name, num_classes=10, pretrained=False)
    with pytest.raises(UsageError, match=f"slim.yaml: model.name: .*{message}"):
        slim.on_model(model=model, run=FakeRun())


def test_film_uses_its_first_channels_at_a_narrower_width():
    from normlab.layers import FiLM

    film = FiLM(8, 4)
    with torch.no_grad():
        for p in film.parameters():
            p.normal_()
    c = torch.randn(1, 4)
    x = torch.randn(2, 8, 3, 3)
    with Context(condition=c).active():
        full = film(x)
        part = film(x[:, :5])
    assert torch.allclose(part, full[:, :5])


# --- the multi-pass step (OATS) -----------------------------------------------------------------------------

OATS = {"seed": 0, "model": {"name": "resnet18", "stem": "cifar"},
        "data": {"batch_size": 16, "n_train": 16, "image_size": 16},
        "train": {"epochs": 1, "val_examples": 32, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0,
                  "warmup_epochs": 0, "schedule": "constant"},
        "plugins": {"slim": {}, "condition": {}, "pgd": {"eps": 0.3, "step_size": 0.1, "steps": 2}},
        "evaluate": {}}


class Recorder:
    """Records what each on_loss call sees."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def on_loss(self, batch, model, ctx, terms):
        self.calls.append({"width": ctx.width, "lam": None if ctx.lam is None else ctx.lam.clone(), "x": batch.x.clone(), "y": batch.y.clone(),
                           "ctx": dataclasses.replace(ctx, state={}, features={})})


def test_one_oats_step_calls_on_loss_per_width_with_shared_lambdas_and_sums_their_gradients(tmp_path, monkeypatch):
    rec = Recorder()
    cfg = copy.deepcopy(OATS)
    cfg["plugins"]["rec"] = {}
    grads = []
    real_step = torch.optim.SGD.step

    def capture(opt, *a, **k):
        grads[:] = [None if p.grad is None else p.grad.clone() for g in opt.param_groups for p in g["params"]]
        return real_step(opt, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", capture)
    normlab.run(cfg, out=tmp_path / "run", plugins={"rec": rec}, quiet=True)
    assert [c["width"] for c in rec.calls] == [1.0, 0.75, 0.5]
    assert all(torch.equal(c["lam"], rec.calls[0]["lam"]) for c in rec.calls)
    assert (rec.calls[0]["lam"] == 0).any() and (rec.calls[0]["lam"] != 0).any()
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)

    # the same step one width at a time, from the same initial weights, on the same rows and lambdas
    run = prepare(parse_run(OATS, "oats.yaml"), "oats.yaml", quiet=True)
    run.build()
    run.train_mode()
    params = run.trainable_parameters()
    total = {id(p): torch.zeros_like(p) for p in params}
    for call in rec.calls:
        for p in params:
            p.grad = None
        ctx = dataclasses.replace(call["ctx"], run=run, state={}, features={})
        batch = normlab.data.Batch(call["x"], call["y"])
        with ctx.active():
            batch.logits = run.model(batch.x)
            terms = LossTerms()
            terms.add("ce", F.cross_entropy(batch.logits, batch.y, reduction="none"))
            run.hooks.call("on_loss", batch=batch, model=run.model, ctx=ctx, terms=terms)
            terms.total().backward()
        for p in params:
            if p.grad is not None:
                total[id(p)] += p.grad
    assert len(grads) == len(params)  # the optimizer's parameters, in trainable_parameters() order
    checked = 0
    for g, p in zip(grads, params):
        if g is None:
            assert total[id(p)].abs().max() == 0
            continue
        assert torch.allclose(g, total[id(p)], rtol=1e-4, atol=1e-6), "a shared weight's gradient"
        checked += 1
    assert checked > 50


class BNInputs:
    """Listed after slim: records the input of every BN leaf in each train-mode forward."""

    def __init__(self):
        self.inputs = {}
        self.modules = {}

    @hookimpl
    def on_batch_norm(self, name, module, model, run):
        for sub, m in module.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                key = f"{name}.{sub}"
                self.modules[key] = m
                m.register_forward_pre_hook(lambda mod, args, key=key: self.inputs.setdefault(key, []).append(
                    args[0].detach().clone()) if mod.training else None)
        return None


def test_each_width_bn_stores_the_batch_statistics_of_its_own_input(tmp_path):
    rec = BNInputs()
    cfg = {**copy.deepcopy(OATS), "plugins": {"slim": {}, "rec": {}}}
    normlab.run(cfg, out=tmp_path / "run", plugins={"rec": rec}, quiet=True)
    widths = {}
    for key, m in rec.modules.items():
        (f,) = rec.inputs[key]  # one train-mode forward per width in the one step
        mean, var = f.mean((0, 2, 3)), f.var((0, 2, 3), unbiased=True)  # computed here, not by BatchNorm
        assert f.shape[1] == m.num_features
        assert torch.allclose(m.running_mean, 0.1 * mean, atol=1e-6)  # fresh BN: 0.9 * 0 + 0.1 * batch mean
        assert torch.allclose(m.running_var, 0.9 + 0.1 * var, atol=1e-5)
        widths.setdefault(key.rsplit(".routes.", 1)[1], set()).add(m.num_features)
    assert widths["0"] >= {64, 512} and widths["2"] >= {32, 256}  # widths 1.0 and 0.5


def test_checkpoint_round_trip_and_eval_at_each_width_reproduce_the_stored_accuracies(tmp_path, capsys):
    cfg = {**copy.deepcopy(OATS), "plugins": {"slim": {"widths": [1.0, 0.5]}},
           "evaluate": {"clean": {"n_examples": 64},
                        "sweep": {"knob": "width", "values": [1.0, 0.5], "evaluators": {"clean": {"n_examples": 64}}}}}
    cfg["data"]["n_train"] = 64
    result = normlab.run(cfg, out=tmp_path / "run", quiet=True)
    stored = result.metrics
    from safetensors.torch import load_file

    weights = load_file(str(result.dir / "checkpoints" / "epoch-0001" / "model.safetensors"))
    assert "backbone.layer1.0.bn1.norm.routes.1.running_mean" in weights
    assert weights["backbone.layer1.0.bn1.norm.routes.1.running_mean"].shape == (32,)
    for w in (1.0, 0.5):
        code = main(["eval", str(result.dir), "--set", f"plugins.slim.width={w}", "--as", f"w{w}", "--quiet"])
        assert code == 0
    import json

    metrics = json.loads((result.dir / "results.json").read_text())["metrics"]
    for w in (1.0, 0.5):
        assert metrics[f"w{w}/clean/acc"] == stored[f"sweep/width={w}/clean/acc"]
        assert metrics[f"w1.0/sweep/width={w}/clean/acc"] == stored[f"sweep/width={w}/clean/acc"]
    assert stored["clean/acc"] == stored["sweep/width=1.0/clean/acc"]
    assert metrics["w1.0/slim/width=0.5/flops"] < 0.3 * metrics["w1.0/slim/width=1.0/flops"]


def built(plugins, **extra):
    cfg = {**copy.deepcopy(OATS), "plugins": plugins, **extra}
    run = prepare(parse_run(cfg, "slim.yaml"), "slim.yaml", quiet=True)
    run.build()
    return run


def test_bnrect_rectifies_only_the_bns_of_the_width_in_use():
    run = built({"slim": {"widths": [1.0, 0.5], "width": 0.5}, "bnrect": {"domains": ["clean"], "n_samples": 16}})
    model = run.model.eval()
    samples, _ = run.domain_samples()
    before = {n: m.running_mean.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    ctx = Context(run=run)
    with run.domain("clean", samples, ctx):
        after = {n: m.running_mean.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
        seen.clear()
        with ctx.active():
            model(run.to_device(samples[:16]))  # the adapted model on the same samples
        for n, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d) and n.endswith("routes.1"):  # width 0.5: its own input's mean
                assert torch.allclose(m.running_mean, seen[n].mean((0, 2, 3)), atol=1e-5), n
    for h in hooks:
        h.remove()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(n.endswith("routes.1") for n in changed)
    assert len(changed) == 20  # every BN of resnet18 at width 0.5, none at width 1.0
    assert all(torch.equal(m.running_mean, before[n]) for n, m in model.named_modules() if n in before)  # undone


@pytest.mark.parametrize("plugins", [
    {"slim": {}},
    {"slim": {"widths": [1.0, 0.5]}, "augmix": {"workers": 0}},
    {"slim": {"widths": [0.5]}, "pgd": {"eps": 0.3, "step_size": 0.1, "steps": 1}},  # a dedicated half network
])
def test_compositions_train_one_step_at_every_width(tmp_path, plugins):
    rec = Recorder()
    cfg = {**copy.deepcopy(OATS), "plugins": {**plugins, "rec": {}}}
    result = normlab.run(cfg, out=tmp_path / "run", plugins={"rec": rec}, quiet=True)
    widths = plugins["slim"].get("widths", [0.5, 0.75, 1.0])
    assert [c["width"] for c in rec.calls] == (sorted(widths, reverse=True) if len(widths) > 1 else [None])
    assert all(torch.equal(c["x"], rec.calls[0]["x"]) for c in rec.calls)  # one batch (augmix views included)
    assert result.history[0]["train_loss"] > 0


def test_advbn_and_nf_conflict_and_a_grid_names_undeclared_knobs(write_yaml, capsys):
    for other, reason in (("advbn", "advbn keeps one front feature"), ("nf", "slimmable")):
        code = main(["run", str(write_yaml({"plugins": {"slim": {}, other: {}}}))])
        assert code == 2 and reason in capsys.readouterr().err
    path = write_yaml({"plugins": {"slim": {}}, "evaluate": {"sweep": {"grid": {"lam": [0, 1], "width": [1.0]}}}})
    assert main(["run", str(path)]) == 2
    assert "evaluate.sweep.grid: no enabled plugin declares knob 'lam'" in capsys.readouterr().err
    path = write_yaml({"plugins": {"slim": {"widths": [1.0, 0.5], "width": 0.25}}})
    assert main(["run", str(path)]) == 2
    assert "plugins.slim: width must be one of widths [1.0, 0.5], got 0.25" in capsys.readouterr().err
    path = write_yaml({"plugins": {"slim": {"widths": [1.0, 0.5]}},
                       "evaluate": {"sweep": {"grid": {"width": [1.0, 0.75]}}}})
    assert main(["run", str(path)]) == 2  # at build time, before any training
    assert "evaluate.sweep.grid.width: expected widths among plugins.slim.widths [1.0, 0.5], got 0.75" in \
        capsys.readouterr().err
    path = write_yaml({"evaluate": {"sweep": {"grid": {"lam": [0, 1]}, "knob": "lam", "values": [0]}}})
    assert main(["run", str(path)]) == 2
    assert "give either grid or knob and values" in capsys.readouterr().err
