"""Normalizer-free conversion (NoFrost): no norm layer left, unit-variance signal propagation, identity
blocks at initialisation, timm's NF counterparts built, AGC, bad input exits 2, and a converted net trains."""

import csv
import math
import re

import pytest
import timm
import torch
from timm.layers import ScaledStdConv2d
from torch import nn

import normlab
import normlab_nf as nf
from normlab.cli import main
from normlab.config import parse_run
from normlab.runner import prepare
from normlab_registry import PluginSpec, ResolutionError, resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def converted(name="resnet18", alpha=0.2):
    torch.manual_seed(0)
    return nf.convert_resnet(timm.create_model(name, num_classes=10), alpha).eval()


def blocks(model, kind=nf.NFBlock):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]


def block_output_variances(model, x, kind=nf.NFBlock):
    """Average channel variance of each residual block's output on ``x``, by forward hooks."""
    out = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: out.__setitem__(n, float(nf.channel_variance(o))))
               for n, m in blocks(model, kind)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def test_relu_gamma_is_the_analytic_constant_and_others_match_timms():
    # Var(relu(z)) = (1 - 1/pi) / 2 for z ~ N(0, 1)
    assert nf.activation_gamma(nn.ReLU()) == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-8)
    from timm.models.nfnet import _nonlin_gamma  # DeepMind's empirical constants

    for act, key in ((nn.SiLU(), "silu"), (nn.GELU(), "gelu"), (nn.Tanh(), "tanh"), (nn.ELU(), "elu")):
        assert nf.activation_gamma(act) == pytest.approx(_nonlin_gamma[key], rel=1e-3), key
    g = nf.GammaAct(nn.ReLU(inplace=True))
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    assert float(g(z).std()) == pytest.approx(1.0, abs=5e-3)
    assert not g.act.inplace  # block inputs are also the skip path


@pytest.mark.parametrize("name", ["resnet18", "resnet26d", "seresnet18"])
def test_no_normalization_layer_remains_and_every_conv_is_weight_standardised(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    assert nf.norm_layers(model)  # the BN model has them
    nf.convert_resnet(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert not any("Norm" in k for k in kinds), kinds
    assert nf.norm_layers(model) == []
    for n, m in model.named_modules():
        if type(m) is nn.Conv2d:  # only squeeze-excitation keeps plain (biased, 1x1) convs, as timm's NF nets
            assert ".se." in n, n
    assert all(isinstance(b, nf.NFBlock) for s in nf.STAGES for b in list(getattr(model, s))[:-1 if s == "layer4"
                                                                                                 else None])
    assert isinstance(model.layer4.act, nf.GammaAct)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_conversion_initialises_as_timm_nf_nets_and_zero_inits_only_the_last_gain_of_each_branch():
    model = converted("resnet18")
    fan_ins = []
    for n, m in model.named_modules():
        if isinstance(m, ScaledStdConv2d):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            last = re.fullmatch(r"layer\d\.\d\.conv2", n) is not None
            assert torch.equal(m.gain, torch.full_like(m.gain, 0.0 if last else 1.0)), n
            fan_ins.append(float(m.weight.detach().var() * m.weight[0].numel()))  # N(0, 1/fan_in): about 1
            # scaled weight standardisation, computed here: (W - mean) / std * gain / sqrt(fan_in)
            flat = m.weight.flatten(1)
            ws = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
            ws = ws * m.gain.flatten(1) / math.sqrt(flat.shape[1])
            x = torch.randn(2, m.in_channels, 8, 8)
            ref = nn.functional.conv2d(x, ws.view_as(m.weight), m.bias, m.stride, m.padding, m.dilation, m.groups)
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    assert fan_ins == pytest.approx([1.0] * len(fan_ins), rel=0.25)
    assert float(model.fc.weight.detach().std()) == pytest.approx(0.01, rel=0.1) and not model.fc.bias.any()
    # transitions pool before the shortcut conv (timm's DownsampleAvg), so no pixel is skipped
    down = model.layer2[0].downsample
    assert isinstance(down[0], nn.AvgPool2d) and down[1].stride == (1, 1) and down[0].stride == (2, 2)


@pytest.mark.parametrize("name", ["resnet18", "resnet26d"])
def test_each_block_is_its_skip_path_at_initialisation(name):
    model = converted(name)
    h = torch.randn(4, 64, 8, 8)
    for n, b in blocks(model):
        h = h[:, :b.conv1.in_channels]
        if h.shape[1] < b.conv1.in_channels:
            h = torch.randn(4, b.conv1.in_channels, 8, 8)
        with torch.no_grad():
            out = b(h)
            if b.downsample is None:
                assert torch.equal(out, h), n  # exactly h + 0.2 * 0
            else:
                assert torch.equal(out, b.downsample(b.act_in(h) / b.beta)), n
            assert torch.count_nonzero(b.branch(b.act_in(h) / b.beta)) == 0
        h = out


@pytest.mark.parametrize("name", ["resnet18", "nf_resnet26"])
def test_branch_ratio_is_zero_at_initialisation_and_a_hand_computation_after(name):
    """The per-epoch diagnostic: RMS(block output - skip) / RMS(skip), for normlab's and timm's NF blocks."""
    torch.manual_seed(0)
    model = converted(name) if name == "resnet18" else timm.create_model(name, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    ratios = nf.branch_ratios(model.eval(), x)
    assert len(ratios) == (8 if name == "resnet18" else 8) and all(r == 0.0 for r in ratios.values()), ratios
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ScaledStdConv2d) and float(m.gain.abs().max()) == 0.0:
                nn.init.ones_(m.gain)
            if getattr(m, "skipinit_gain", None) is not None:
                nn.init.ones_(m.skipinit_gain)
    ratios = nf.branch_ratios(model, x)
    first_name = next(iter(ratios))
    block, seen = model.get_submodule(first_name), {}
    handle = block.register_forward_pre_hook(lambda m, i: seen.setdefault("h", i[0].clone()))
    with torch.no_grad():
        model(x)
        handle.remove()
        h = seen["h"]
        out, skip = block(h), nf._skip(block, h)
    by_hand = float((out - skip).pow(2).mean().sqrt() / skip.pow(2).mean().sqrt())
    assert ratios[first_name] == pytest.approx(by_hand, rel=1e-5) and by_hand > 0.01


def test_beta_follows_the_expected_variance_and_matches_timm_nf_resnet26():
    model = converted("resnet18")
    expected = [1.0, 1.04, 1.08, 1.04, 1.08, 1.04, 1.08, 1.04]  # +alpha^2 per block, 1 + alpha^2 after transitions
    assert [b.beta for _, b in blocks(model)] == pytest.approx([math.sqrt(v) for v in expected])
    # resnet26 converted in place has timm nf_resnet26's block structure: the same betas (timm stores 1/beta)
    ours = [b.beta for _, b in blocks(converted("resnet26"))]
    theirs = [1 / b.beta for _, b in blocks(timm.create_model("nf_resnet26", num_classes=10),
                                            timm.models.nfnet.NormFreeBlock)]
    assert ours == pytest.approx(theirs, rel=1e-12)


def built_run(plugins, name="resnet18"):
    cfg = parse_run({"seed": 0, "model": {"name": name}, "data": {"name": "mnist"}, "train": {"epochs": 0},
                     "plugins": plugins, "evaluate": {}}, "nf.yaml")
    run = prepare(cfg, "nf.yaml", quiet=True)
    run.build()
    return run


def test_activation_variance_stays_of_order_one_through_depth():
    """On held-out digits, every block's average channel variance is 1 at initialisation (the stem and shortcut
    gains are calibrated on training digits) and grows by about alpha^2 per block once the branches contribute.
    Without calibration the pooling points lose variance stage by stage (as timm's nf_resnet26 does)."""
    plain_run = built_run({"nf": {"calibrate": 0}})
    test_x = torch.stack([plain_run.data.test[i][0] for i in range(0, 1000, 4)])

    def profile(run, ones=False):
        model = run.model.eval()
        if ones:  # as after training: every branch contributes
            for _, b in blocks(model):
                nn.init.ones_(b.last_conv.gain)
        return list(block_output_variances(model, test_x).values())

    for name in ("resnet18", "resnet50"):  # basic blocks; bottlenecks with a stride-1 shortcut in layer1
        run = built_run({"nf": {"calibrate": 64}}, name)
        at_init = profile(run)
        assert at_init == pytest.approx([1.0] * len(at_init), abs=0.1), (name, at_init)
        trained = profile(run, ones=True)
        assert all(0.9 <= v <= 2.0 for v in trained), (name, trained)
        growth = [b / a for a, b in zip(trained, trained[1:])]
        assert all(0.8 <= g <= 1.25 for g in growth), (name, growth)  # block to block, transitions included
    plain = profile(plain_run)
    assert plain[-1] < 0.1 < 0.5 < plain[0], plain  # measured 0.83 ... 0.06


def test_calibration_scales_only_the_pooling_points_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    run = built_run({"nf": {}})
    torch.set_rng_state(state)
    images = nf.calibration_images(run, 64)
    assert torch.equal(torch.get_rng_state(), state)
    again = nf.calibration_images(run, 64)
    assert images.shape == (64, 3, 32, 32) and torch.equal(images, again)
    # the backbone's normalised inputs: the data's mean and std
    assert float(images.mean()) == pytest.approx(0.0, abs=0.15) and float(images.std()) == pytest.approx(1, abs=0.15)
    model = converted("resnet18")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, ScaledStdConv2d)}
    before = {m: m.gain.clone() for m in convs.values()}
    factors = nf.calibrate(model, images)
    scaled = {n for n, m in convs.items() if not torch.equal(m.gain, before[m])}
    assert scaled == {"conv1", "layer2.0.downsample.1", "layer3.0.downsample.1", "layer4.0.downsample.1"}
    assert len(factors) == 4 and all(f > 1 for f in factors[1:])  # the average pools had lost variance
    for (measured, conv), f in zip(nf.pooling_points(model), factors):
        assert torch.allclose(conv.gain, before[conv] * f)


def test_agc_hook_equals_timms_adaptive_clip_grad():
    from timm.utils.agc import adaptive_clip_grad

    torch.manual_seed(0)
    a = timm.create_model("resnet18", num_classes=10)
    nf.convert_resnet(a)
    b = nf.convert_resnet(timm.create_model("resnet18", num_classes=10))
    b.load_state_dict(a.state_dict())
    assert nf.add_agc(a, 0.01) == len(list(a.parameters())) - 2  # not the classifier
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    for m in (a, b):
        for blk in m.modules():
            if isinstance(blk, nf.NFBlock):
                nn.init.ones_(blk.last_conv.gain)
        nn.functional.cross_entropy(m(x) * 10, y).backward()
    adaptive_clip_grad([p for n, p in b.named_parameters() if not n.startswith("fc.")], clip_factor=0.01)
    clipped = 0
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-8)
    # and it did clip something
    raw = nf.convert_resnet(timm.create_model("resnet18", num_classes=10))
    raw.load_state_dict(a.state_dict())
    for blk in raw.modules():
        if isinstance(blk, nf.NFBlock):
            nn.init.ones_(blk.last_conv.gain)
    nn.functional.cross_entropy(raw(x) * 10, y).backward()
    for pa, pr in zip(a.parameters(), raw.parameters()):
        clipped += int(not torch.equal(pa.grad, pr.grad))
    assert clipped > 0


def build(model, **nf_cfg):
    cfg = {"seed": 0, "model": {"name": model}, "data": {"name": "mnist"}, "plugins": {"nf": nf_cfg},
           "evaluate": {}}
    run = prepare(parse_run(cfg, "nf.yaml"), "nf.yaml", quiet=True)
    run.build()
    return run.model.backbone


@pytest.mark.parametrize("name,target", [("resnet26", "nf_resnet26"), ("seresnet50", "nf_seresnet50"),
                                         ("regnetx_002", "nf_regnet_b0")])
def test_counterparts_are_built_with_the_runs_classes(name, target):
    model = build(name)
    assert isinstance(model, timm.models.nfnet.NormFreeNet)
    assert model.pretrained_cfg["architecture"] == target
    assert model.num_classes == 10 and nf.norm_layers(model) == []


def test_modes_target_and_nf_backbones():
    assert isinstance(build("resnet26", mode="convert"), timm.models.resnet.ResNet)  # converted, not built
    assert build("resnet18", target="nf_resnet26").pretrained_cfg["architecture"] == "nf_resnet26"
    kept = build("nf_resnet26")  # already normalizer-free: kept
    assert kept.pretrained_cfg["architecture"] == "nf_resnet26"


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


BAD = {
    "unsupported family": ("model: {name: efficientnet_b0}\nplugins: {nf: {}}",
                           r"nf.yaml: model.name: plugins.nf supports timm ResNets .*; got 'efficientnet_b0'"),
    "build without counterpart": ("model: {name: resnet18}\nplugins: {nf: {mode: build}}",
                                  r"nf.yaml: plugins.nf.mode: 'build' needs a timm NF counterpart and 'resnet18'"),
    "bad target": ("plugins: {nf: {target: resnet50}}",
                   r"nf.yaml: plugins.nf.target: expected one of timm's NF models \(nf_ecaresnet26, .*\), got 'resnet50\'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    text, pattern = BAD[case]
    path = tmp_path / "nf.yaml"
    path.write_text(text + "\nevaluate: {}\n")
    code, lines = run_cli(["run", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_bn_checkpoint_cannot_initialise_an_nf_model(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", num_classes=10).state_dict(), str(tmp_path / "bn.safetensors"))
    path = tmp_path / "nf.yaml"
    path.write_text(f"model: {{name: resnet18, checkpoint: {tmp_path / 'bn.safetensors'}}}\n"
                    f"plugins: {{nf: {{}}}}\nevaluate: {{}}\n")
    code, lines = run_cli(["run", path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(lines) == 1
    assert re.search(r"nf.yaml: model.checkpoint: a BN checkpoint cannot initialise an NF model", lines[0])
    assert not (tmp_path / "out").exists()


def test_an_nf_runs_checkpoint_initialises_another_nf_run(tmp_path):
    """The checkpoint fits only the converted model, so the host loads it after on_model."""
    from safetensors.torch import save_file

    cfg = {"seed": 0, "model": {"name": "resnet18"}, "data": {"n_train": 64, "batch_size": 32},
           "train": {"epochs": 0}, "plugins": {"nf": {}}, "evaluate": {"clean": {"n_examples": 64}}}
    first = normlab.run(cfg, out=tmp_path / "a", quiet=True)
    with torch.no_grad():
        for p in first.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights a fresh build would not have
    save_file({k: v.contiguous() for k, v in first.model.state_dict().items()}, str(tmp_path / "nf.safetensors"))
    again = normlab.run({**cfg, "model": {"name": "resnet18", "checkpoint": str(tmp_path / "nf.safetensors")}},
                        out=tmp_path / "b", quiet=True)
    mine, theirs = first.model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_pretrained_bn_weights_are_refused():
    from types import SimpleNamespace

    model_cfg = SimpleNamespace(name="resnet18", checkpoint=None, pretrained=True, robustbench=None)
    run = SimpleNamespace(plugin_config=lambda name: nf.Config(), source="nf.yaml", checkpoint_stage=None,
                          config=SimpleNamespace(model=model_cfg))
    with pytest.raises(normlab.UsageError, match=r"^nf.yaml: model.pretrained: timm's pretrained weights of "
                                                 r"'resnet18' are BN weights and cannot initialise an NF model"):
        nf.on_model(model=timm.create_model("resnet18"), run=run)


@pytest.mark.parametrize("other", ["bnrect", "condition", "advbn", "slim"])
def test_registry_declares_the_conflicts(other):
    spec = PluginSpec("nf", conflicts=nf.conflicts, extra={"conflict_reasons": nf.conflict_reasons})
    with pytest.raises(ResolutionError, match=f"'{other}' and 'nf' conflict: nf removes every BN layer"
                       if other != "slim" else "'nf' and 'slim' conflict: slimmable"):
        resolve([other, "nf"], {"nf": spec, other: PluginSpec(other)})


@pytest.mark.slow
def test_a_converted_resnet18_trains_from_scratch(tmp_path):
    cfg = {"seed": 0, "model": {"name": "resnet18"}, "data": {"name": "mnist", "batch_size": 64, "n_train": 1600,
                                                           "image_size": 24},
           "train": {"val_examples": 100, "epochs": 2, "lr": 0.01, "warmup_epochs": 0.5, "label_smoothing": 0.1},
           "plugins": {"nf": {"calibrate": 64}}, "evaluate": {"clean": {}}}  # calibrate 0 (the default): 0.51
    result = normlab.run(cfg, out=tmp_path / "run", quiet=True)
    assert nf.norm_layers(result.model) == []
    assert result.metrics["clean/acc"] >= 0.8  # on the 1,000 held-out digits (measured 0.863; at 32 px 0.892)
    rows = list(csv.DictReader((result.dir / "metrics.csv").open()))
    ratios = [float(r["nf/branch_ratio/mean"]) for r in rows]
    assert len(ratios) == 2 and 0.0 < ratios[0] and all(float(rows[-1][f"nf/branch_ratio/layer{i}.0"]) >= 0
                                                           for i in range(1, 5))
