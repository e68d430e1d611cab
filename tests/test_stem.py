"""model.stem: cifar, the small-input stem (issue 17, item 5)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import normlab
from normlab.config import parse_run
from normlab.errors import UsageError
from normlab.model import small_input_stem
from normlab.runner import prepare


def stage_sizes(model, x):
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)] if hasattr(model, "layer1") else list(model.stages)
    sizes = []
    handles = [s.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:]))) for s in stages]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return sizes


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "nf_resnet26"])
def test_feature_maps_are_32_16_8_4_at_32_pixels(name):
    model = timm.create_model(name, num_classes=10)
    assert stage_sizes(model, torch.rand(2, 3, 32, 32))[-1] == (1, 1)  # the ImageNet stem: layer4 at 1x1
    small_input_stem(model)
    assert stage_sizes(model, torch.rand(2, 3, 32, 32)) == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_the_new_first_conv_is_3x3_stride_1_and_initialised_like_timm():
    torch.manual_seed(0)
    model = small_input_stem(timm.create_model("resnet18", num_classes=10))
    conv = model.conv1
    assert isinstance(model.maxpool, nn.Identity)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.out_channels) == ((3, 3), (1, 1), (1, 1), 64)
    # kaiming normal, fan_out, relu: std = sqrt(2 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    nf = small_input_stem(timm.create_model("nf_resnet26", num_classes=10))
    assert type(nf.stem.conv).__name__ == "ScaledStdConv2d" and nf.stem.conv.stride == (1, 1)
    eff = small_input_stem(timm.create_model("efficientnet_b0", num_classes=10))
    assert eff.conv_stem.stride == (1, 1)


def test_unsupported_family_is_a_usage_error_naming_what_is_supported():
    with pytest.raises(UsageError, match="model.stem: 'cifar' is defined for timm ResNet.*VisionTransformer"):
        small_input_stem(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32), "model.stem")


SETTINGS = {"advbn": {"steps": 1}, "augmix": {"workers": 0}, "bnrect": {"n_samples": 8},
            "condition": {}, "nf": {"calibrate": 0}, "pgd": {"steps": 1}}


# every plugin, in three compositions (nf removes the BNs that the others route or rectify)
@pytest.mark.parametrize("plugins", [["augmix", "advbn", "bnrect"], ["condition", "pgd", "bnrect"], ["nf", "pgd"]])
def test_every_plugin_trains_and_evaluates_on_the_cifar_stem(plugins, tmp_path):
    config = {
        "seed": 0, "adapt_samples": 8, "model": {"name": "resnet18", "stem": "cifar"},
        "data": {"name": "mnist", "image_size": 16, "batch_size": 16, "n_train": 16},
        "train": {"val_examples": 100, "epochs": 1, "lr": 0.01},
        "plugins": {p: SETTINGS[p] for p in plugins},
        "evaluate": {"clean": {"n_examples": 16}, "style": {"n_examples": 16, "domains": ["invert"]}},
    }
    res = normlab.run(config, out=tmp_path / "run", quiet=True)
    assert 0.0 <= res.metrics["clean/acc"] <= 1.0 and 0.0 <= res.metrics["style/invert/acc"] <= 1.0
    backbone = res.model.backbone
    first = backbone.stem.conv if hasattr(backbone, "stem") else backbone.conv1
    assert first.stride == (1, 1) and first.kernel_size == (3, 3)
    assert stage_sizes(backbone, torch.rand(2, 3, 16, 16)) == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_nf_keeps_the_cifar_stem_when_it_builds_timms_nf_counterpart(tmp_path):
    config = {"model": {"name": "resnet26", "stem": "cifar"}, "plugins": {"nf": {"calibrate": 0}},
              "data": {"image_size": 32}}
    run = prepare(parse_run(config, "run.yaml"), "run.yaml", quiet=True)
    run.build()
    backbone = run.model.backbone
    assert type(backbone).__name__ == "NormFreeNet"
    assert stage_sizes(backbone, torch.rand(2, 3, 32, 32)) == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_the_input_check_at_build_changes_no_state_and_refuses_a_stem_that_shrinks_the_input_to_nothing():
    from normlab.model import check_input

    model = timm.create_model("resnet18", num_classes=10, drop_rate=0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_input(model, 3, 32, parse_run({}, "run.yaml").model, "run.yaml")
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # eval mode inside: no dropout draws
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics included
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, stride=2))  # 4 px -> 1 -> nothing
    with pytest.raises(UsageError, match=r"run.yaml: model.name: 'resnet18' cannot take this run's 3x4x4 images"):
        check_input(tiny, 3, 4, parse_run({}, "run.yaml").model, "run.yaml")
