"""Convolutions skip the kernel taps that meet only zero padding (normlab.layers.taps): the same numbers."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from normlab.layers import live_taps, padding_taps_kept, skip_padding_taps


def test_live_taps_by_hand():
    assert live_taps(1, 3, 1, 1, 1) == (1, 2)  # 3x3, padding 1, on a 1x1 map: the centre only
    assert live_taps(2, 3, 2, 1, 1) == (1, 3)  # stride 2 on a 2x2 map: one output at -1..1, taps 1 and 2
    assert live_taps(2, 3, 1, 1, 1) == (0, 3)  # stride 1 on 2x2: every tap meets the input somewhere
    assert live_taps(1, 7, 2, 3, 1) == (3, 4)  # an ImageNet stem's 7x7 on a 1x1 input
    assert live_taps(3, 3, 1, 2, 2) == (0, 3)  # dilation 2: taps at -2, 0, 2 around each output
    assert live_taps(1, 3, 1, 2, 2) == (1, 2)
    assert live_taps(8, 3, 1, 1, 1) == (0, 3)


CASES = [  # (in, out, kernel, stride, padding, dilation, groups, input size, what runs: by hand)
    (8, 6, 3, 1, 1, 1, 1, (1, 1), ("linear", 8)),        # the centre tap: one output, a matrix product
    (8, 6, 3, 2, 1, 1, 1, (2, 2), ("linear", 8 * 4)),    # taps 1..2 meet the 2x2 map at one output
    (8, 6, 3, 2, 1, 1, 1, (2, 3), ("conv", (2, 3))),
    (8, 6, 3, 1, 1, 1, 1, (2, 2), ("conv", (3, 3))),     # nothing to skip
    (8, 8, 3, 1, 1, 1, 4, (1, 2), ("conv", (1, 3))),     # grouped, a 1x2 map: rows cropped, columns kept
    (3, 6, 7, 2, 3, 1, 1, (1, 1), ("linear", 3)),
    (3, 6, 7, 2, 3, 1, 1, (3, 3), ("conv", (5, 5))),
    (8, 6, 5, 1, 2, 1, 1, (1, 4), ("conv", (1, 5))),
    (8, 6, 3, 1, 2, 2, 1, (1, 1), ("linear", 8)),
    (8, 6, (3, 1), 1, (1, 0), 1, 1, (1, 5), ("conv", (1, 1))),
    (8, 6, 1, 2, 0, 1, 1, (2, 2), ("linear", 8)),        # resnet's 1x1 stride-2 downsample: pixel (0, 0)
    (4, 6, 3, 1, 0, 2, 1, (5, 5), ("linear", 4 * 9)),    # dilated, unpadded: one output from 9 of 25 pixels
    (4, 6, 2, 3, 0, 1, 1, (3, 4), ("linear", 4 * 4)),    # the stride leaves room for one output only
    (8, 6, 3, 1, 1, 2, 1, (3, 3), ("conv", (3, 3))),     # padding 1, dilation 2: cropping would pad by -1
]


@pytest.mark.parametrize("cin, cout, k, s, p, d, g, size, runs", CASES)
def test_a_cropped_convolution_gives_the_plain_numbers(cin, cout, k, s, p, d, g, size, runs):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=True).double()
    x = torch.randn(5, cin, *size, dtype=torch.float64, requires_grad=True)

    def run():
        y = conv(x)
        gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        gx, gw, gb = torch.autograd.grad(y, (x, conv.weight, conv.bias), gy)
        return y, gx, gw, gb

    plain = run()
    assert skip_padding_taps(conv) == 1
    calls = []
    real_conv, real_linear = F.conv2d, F.linear
    try:
        F.conv2d = lambda inp, w, *a: calls.append(("conv", tuple(w.shape[-2:]))) or real_conv(inp, w, *a)
        F.linear = lambda inp, w, *a: calls.append(("linear", w.shape[1])) or real_linear(inp, w, *a)
        cropped = run()
    finally:
        F.conv2d, F.linear = real_conv, real_linear
    for a, b in zip(plain, cropped):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert calls == [runs]  # it ran on the live taps alone, as a matrix product where one output is left
    kh, kw = conv.kernel_size
    rows = live_taps(size[0], kh, conv.stride[0], conv.padding[0], conv.dilation[0])
    cols = live_taps(size[1], kw, conv.stride[1], conv.padding[1], conv.dilation[1])
    # the skipped taps' gradient is zero, as the plain convolution's is: they meet only zeros
    mask = torch.zeros(kh, kw, dtype=torch.bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert torch.equal(plain[2][..., ~mask], torch.zeros_like(plain[2][..., ~mask]))


def test_one_output_position_in_channels_last_and_an_empty_batch():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, 2, 1).double()
    x = torch.randn(4, 6, 2, 2, dtype=torch.float64).to(memory_format=torch.channels_last)
    plain = conv(x)
    skip_padding_taps(conv)
    torch.testing.assert_close(conv(x), plain, rtol=1e-12, atol=1e-12)
    conv.to(memory_format=torch.channels_last)  # a channels-last kernel flattens (H, W, C), the pixels with it
    for inp in (x, x.contiguous()):
        torch.testing.assert_close(conv(inp), plain, rtol=1e-12, atol=1e-12)
    assert conv(x[:0]).shape == (0, 5, 1, 1)
    torch.testing.assert_close(conv(x[1]), plain[1], rtol=1e-12, atol=1e-12)  # an unbatched input, as nn.Conv2d takes


@pytest.mark.parametrize("size, live", [((1, 1), (1, 2, 1, 2)), ((2, 2), (1, 3, 1, 3)), ((1, 4), (1, 2, 0, 3))])
def test_the_kernel_gradient_is_laid_out_as_the_kernel_and_zero_on_skipped_taps(size, live):
    """The crop's gradient is written once into zeros in the weight's own layout, so accumulating it into a
    channels-last weight's .grad needs no transposition (it took 46 ms of a 32x32 resnet18 step)."""
    torch.manual_seed(0)
    h0, h1, w0, w1 = live
    for layout in (torch.contiguous_format, torch.channels_last):
        conv = nn.Conv2d(6, 5, 3, 2 if size == (2, 2) else 1, 1, bias=False).double().to(memory_format=layout)
        x = torch.randn(3, 6, *size, dtype=torch.float64).to(memory_format=layout)
        (plain,) = torch.autograd.grad(conv(x).square().sum(), conv.weight)
        skip_padding_taps(conv)
        arriving = []  # the gradient as the crop hands it over, before .grad accumulation lays it out
        handle = conv.weight.register_hook(lambda g: arriving.append(g.is_contiguous(memory_format=layout)))
        conv(x).square().sum().backward()
        handle.remove()
        grad = conv.weight.grad
        assert arriving == [True] and grad.is_contiguous(memory_format=layout)
        torch.testing.assert_close(grad, plain, rtol=1e-12, atol=1e-12)
        kept = torch.zeros(3, 3, dtype=torch.bool)
        kept[h0:h1, w0:w1] = True
        assert grad[:, :, ~kept].abs().sum() == 0 and grad[:, :, kept].abs().sum() > 0
        # a second-order gradient through the crop (create_graph) equals the plain convolution's
        twin = nn.Conv2d(6, 5, 3, conv.stride, 1, bias=False).double()
        twin.load_state_dict(conv.state_dict())

        def second(c):
            (g,) = torch.autograd.grad(c(x).square().sum(), c.weight, create_graph=True)
            return torch.autograd.grad(g.square().sum(), c.weight)[0]

        torch.testing.assert_close(second(conv), second(twin), rtol=1e-12, atol=1e-12)


def test_resnet18_at_32px_skips_layer4s_padding_and_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, i[0].shape[-1]))

    def run():
        out = model(x)
        return (out, *torch.autograd.grad(out.square().sum(), [model.conv1.weight, model.layer4[1].conv2.weight]))

    plain = run()
    assert skip_padding_taps(model) == 20
    cropped = run()
    for a, b in zip(plain, cropped):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert shapes["layer4.1.conv2"] == 1 and shapes["layer4.0.conv1"] == 2  # the maps the crop is for
    with padding_taps_kept(model):
        assert "_conv_forward" not in model.layer4[1].conv2.__dict__
    assert "_conv_forward" in model.layer4[1].conv2.__dict__
    # a deep copy's convolutions crop with their own weights (benchmarks copy models)
    twin = copy.deepcopy(model)
    assert twin.layer4[1].conv1._conv_forward.__self__ is twin.layer4[1].conv1
    with torch.no_grad():
        twin.layer4[1].conv1.weight.mul_(2)
        f = torch.randn(2, 512, 1, 1, dtype=torch.float64)
        torch.testing.assert_close(twin.layer4[1].conv1(f), 2 * model.layer4[1].conv1(f))
    assert skip_padding_taps(model) == 0  # once per convolution


def test_random_geometries_give_the_plain_numbers():
    """Kernel, stride, padding, dilation, groups, map size and layouts drawn at random (seeded): every
    convolution with an output gives the plain outputs and gradients in float64, cropped, as a matrix product
    or unchanged."""
    import random

    rng = random.Random(0)
    torch.manual_seed(0)
    checked = 0
    while checked < 300:
        k, s, p, d = ([rng.randint(1, hi), rng.randint(1, hi)] for hi in (5, 3, 3, 3))
        g, size = rng.choice([1, 1, 2]), [rng.randint(1, 6), rng.randint(1, 6)]
        if any((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] < 0 for i in (0, 1)):
            continue  # no output: the plain convolution refuses it too
        conv = nn.Conv2d(2 * g, 3 * g, k, s, p, d, g, bias=rng.random() < 0.5).double()
        x = torch.randn(2, 2 * g, *size, dtype=torch.float64)
        if rng.random() < 0.5:  # either layout, for the kernel and for the input
            conv.to(memory_format=torch.channels_last)
        if rng.random() < 0.5:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        y = conv(x)
        gy = torch.randn_like(y)
        plain = (y, *torch.autograd.grad(y, (x, conv.weight), gy))
        skip_padding_taps(conv)
        y = conv(x)
        for a, b in zip(plain, (y, *torch.autograd.grad(y, (x, conv.weight), gy))):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"k {k} s {s} p {p} d {d} g {g} {size}")
        checked += 1


@pytest.mark.parametrize("kind", ["StdConv2d", "ScaledStdConv2d"])
def test_timms_weight_standardised_convolutions_crop_and_give_timms_numbers(kind):
    """timm's NF convolutions call F.conv2d themselves; their forward is routed through the crop. The same
    outputs and gradients (input, kernel, gain, bias) as timm's own forward, where the crop applies and where
    not, in both layouts, and with padding_taps_kept."""
    import timm.layers

    torch.manual_seed(0)
    for stride, size in ((1, 1), (2, 2), (1, 4), (2, 3)):
        timms = getattr(timm.layers, kind)(6, 5, 3, stride=stride, padding=1, bias=True).double()
        with torch.no_grad():
            timms.bias.normal_()
            if hasattr(timms, "gain"):
                timms.gain.uniform_(0.5, 1.5)
        for layout in (torch.contiguous_format, torch.channels_last):
            ours = copy.deepcopy(timms).to(memory_format=layout)
            assert skip_padding_taps(ours) == 1 and "forward" in ours.__dict__
            x = torch.randn(3, 6, size, size, dtype=torch.float64).to(memory_format=layout)

            def numbers(conv):
                inp = x.clone().requires_grad_()
                out = conv(inp)
                return (out, *torch.autograd.grad(out.square().sum(), [inp, *conv.parameters()]))

            want, got = numbers(timms), numbers(ours)
            with padding_taps_kept(ours):
                kept = numbers(ours)
            for a, b, c in zip(want, got, kept):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


def test_an_nf_resnet_at_32px_gives_timms_numbers_with_the_crop():
    torch.manual_seed(0)
    model = timm.create_model("nf_resnet26", num_classes=10).double()
    twin = copy.deepcopy(model)
    convs = skip_padding_taps(twin)
    assert convs == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum("forward" in m.__dict__ for m in twin.modules()) == convs  # all timm's ScaledStdConv2d
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    outs = []
    for m in (model, twin):
        torch.manual_seed(1)  # any drop-path or dropout draws the same
        outs.append(m(x))
        outs[-1].square().sum().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10, msg=name)
