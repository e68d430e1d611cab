"""Adaptive attacks (issue 15): the attacked batch adapts the model, gradients run through the adaptation,
discrete choices are attacked one value at a time, and with nothing adapting adaptive equals static."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab_advbn as advbn
import normlab_bnrect as bnrect
from conftest import copy_run
from normlab.config import parse_run
from normlab.context import Context
from normlab.evals import Report
from normlab.evals.adaptive import Adaptive, fixings
from normlab.evals.attacks import _original_autoattack, attack_mode, pgd
from normlab.evals.settings import AutoAttackConfig, PGDConfig
from normlab.manager import Hooks
from normlab.results import read_outcomes
from normlab.runner import Run, prepare

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyRun:
    """What :class:`Adaptive` and the attacks use of a run, around a hand-built model: the real
    ``Run.domain`` and the real hook caller."""

    domain = Run.domain

    def __init__(self, model, plugins=(), configs=None):
        self.model, self.hooks, self.state = model, Hooks(plugins), {}
        self.configs = configs or {}
        self.log = logging.getLogger("test")
        self.device = torch.device("cpu")
        self.data = type("Data", (), {"num_classes": 10})()
        self.config = type("Config", (), {"seed": 0})()

    @property
    def adapts(self):
        return bool(self.hooks.implemented("on_domain"))

    def plugin_config(self, name):
        return self.configs[name]

    def to_device(self, x):
        return x


def tiny(dtype=torch.float64, classes=3):
    """conv-BN-ReLU-conv-BN-ReLU-pool-fc with non-trivial source statistics, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    with torch.no_grad():
        model.train()
        for _ in range(5):
            model(torch.randn(32, 3, 6, 6) * 2 + 1)
    return model.to(dtype).eval()


def bnrect_run(model, **settings):
    return TinyRun(model, [("bnrect", bnrect)], {"bnrect": bnrect.Config(domains=["clean"], **settings)})


def test_adaptive_gradient_through_bnrect_equals_finite_differences():
    """d loss / d x of the adaptive view runs through the batch statistics: it equals a central finite
    difference of the adapted model's loss (statistics re-estimated at each perturbed input), and the
    static gradient (statistics frozen at those of x) does not."""
    model = tiny()
    run = bnrect_run(model, n_samples=8)
    ctx = Context(run=run)
    x = torch.rand(8, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.3
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    view = Adaptive(model, run)

    def loss(z):
        with ctx.active():
            return F.cross_entropy(view(z), y, reduction="sum")

    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(xg), xg)

    def fd(v, h=1e-6):
        with torch.no_grad():
            return float((loss(x + h * v) - loss(x - h * v)) / (2 * h))

    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert float((grad * v).sum()) == pytest.approx(fd(v), rel=1e-6)

    undo, used, _, n = bnrect.rectify(model, x, run.configs["bnrect"])  # static: adapted once, to x
    assert used == ["1", "4"] and n == 8
    with torch.no_grad():  # the same function at x
        torch.testing.assert_close(model(x), view(x), rtol=1e-5, atol=1e-6)
    (static,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    undo()
    d = grad - static  # along the direction where the two differ, the finite difference sides with adaptive
    assert float(d.norm()) > 0.1 * float(grad.norm())
    assert float((grad * d).sum()) == pytest.approx(fd(d), rel=1e-6)
    assert abs(float((static * d).sum()) - fd(d)) == pytest.approx(float((d * d).sum()), rel=1e-6)


def test_with_nothing_adapting_the_view_is_the_model_and_autoattack_runs_unchanged():
    model = tiny(torch.float32, classes=10)
    x = torch.rand(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    cfg = AutoAttackConfig(version="fast", eps=0.25)
    out, right = {}, {}
    for name, run in (("static", TinyRun(model)), ("adaptive", bnrect_run(model, n_samples=8)),
                      ("adaptive off", TinyRun(model, [("bnrect", bnrect)], {"bnrect": bnrect.Config()}))):
        target = model if name == "static" else Adaptive(model, run)
        with attack_mode(model), Context(run=run).active():
            y = target(x).argmax(1)  # every image starts right
            out[name] = _original_autoattack(target, run, cfg, 0.25)(x, y)
            right[name] = int((target(out[name]).argmax(1) == y).sum())
    assert torch.equal(out["adaptive off"], out["static"])  # bnrect adapts no clean domain by default
    assert (out["adaptive"] - x).abs().max() <= 0.25 + 1e-6
    assert right["adaptive"] < 16 and right["static"] < 16
    assert not torch.equal(out["adaptive"], out["static"])


def test_on_choices_gives_each_route_only_for_auto_and_a_fixed_route_is_kept():
    cfg = parse_run({"seed": 0, "data": {"batch_size": 16}, "train": {"val_examples": 100, "epochs": 1},
                     "plugins": {"advbn": {"route": "auto"}}, "evaluate": {}}, "test.yaml")
    run = prepare(cfg, "test.yaml", quiet=True)
    run.build()
    ctx = Context(run=run)
    assert fixings(run, ctx) == [{"route": "main"}, {"route": "aux"}]
    assert fixings(run, Context(run=run, route="main")) == [{}]  # a sweep's fixed value: nothing to choose
    model = run.model.eval()
    calls = []
    real = advbn.route_divergences
    x = torch.rand(8, 3, 32, 32)
    try:
        advbn.route_divergences = lambda *a: calls.append(1) or real(*a)
        with torch.no_grad(), ctx.active():
            Adaptive(model, run, fixed={"route": "aux"})(x)
            assert not calls  # the route is fixed: nothing chosen
            Adaptive(model, run)(x)
            assert len(calls) == 1  # chosen from this forward's own batch
            assert "auto" not in run.state.get("advbn", {})  # nothing recorded per domain
        report = Report()
        pgd(model, ctx, report, PGDConfig(adapt="adaptive", n_examples=16, batch_size=8, steps=2, eps=0.1))
    finally:
        advbn.route_divergences = real
    # per batch of 8: the clean prediction chooses; if an image was right, so does the check of each
    # candidate (route main fixed, aux fixed, the static attack's images) and the static attack's domain
    # entry (once, from the clean samples); the attacks' own forwards through the view never choose
    correct = report.outcomes["pgd/adaptive/clean_acc"].scores.reshape(2, 8)
    attacked = int(correct.any(1).sum())
    assert len(calls) - 1 == 2 + 4 * attacked
    assert 0 <= report.metrics["pgd/adaptive/acc"] <= report.metrics["pgd/adaptive/clean_acc"]


# --- end to end on a trained model -------------------------------------------------------------------------

ATTACKS = "evaluate={pgd: {adapt: both, n_examples: 64, eps: 0.03, steps: 5}, " \
          "apgd: {adapt: both, n_examples: 48, eps: 0.03, steps: 4}}"


@pytest.fixture(scope="module")
def bnrect_eval(small_trained, tmp_path_factory):
    """The trained model with bnrect adapting its clean domain, attacked statically and adaptively."""
    run_dir = copy_run(small_trained, tmp_path_factory.mktemp("adaptive") / "run")
    return normlab.evaluate(run_dir, overrides=["plugins.bnrect={domains: [clean]}", ATTACKS], quiet=True)


def test_adaptive_keeps_per_batch_the_worst_candidate_on_the_bnrect_model(bnrect_eval):
    """Adaptive robust accuracy is at most that of each candidate alone (the attack through the statistics,
    the static attack's images judged by the adapting model), and is reported with the static one."""
    m = bnrect_eval.metrics
    records = json.loads((bnrect_eval.dir / "results.json").read_text())["records"]["adaptive"]
    for name in ("pgd", "apgd"):
        candidates = records[f"{name}/adaptive"]["candidates_acc"]
        assert set(candidates) == {"through the adaptation", "transfer from static"}
        assert m[f"{name}/adaptive/acc"] <= min(candidates.values()) + 1e-12
        assert m[f"{name}/adaptive/acc/ci_low"] <= m[f"{name}/adaptive/acc"] <= m[f"{name}/adaptive/acc/ci_high"]
        assert m[f"{name}/adaptive/clean_acc"] > 0.8 and m[f"{name}/acc"] < m[f"{name}/clean_acc"]
    outcomes = read_outcomes(bnrect_eval.dir)
    assert outcomes["pgd/adaptive/acc"][1] == outcomes["pgd/acc"][1]  # the same images, paired in compare
    from normlab.cli import _Entry, compare_table  # noqa: PLC0415

    table = compare_table([_Entry(str(bnrect_eval.dir))], None)
    assert "pgd/adaptive/acc" in table and "pgd/acc" in table


def test_adaptive_equals_static_exactly_when_no_plugin_adapts_the_clean_domain(small_trained, tmp_path):
    run_dir = copy_run(small_trained, tmp_path / "run")
    res = normlab.evaluate(run_dir, overrides=["plugins.bnrect={}", ATTACKS], quiet=True)  # corruptions/style only
    m = res.metrics
    outcomes = read_outcomes(res.dir)
    for name in ("pgd", "apgd"):
        assert 0 < m[f"{name}/acc"] < m[f"{name}/clean_acc"]  # the attack does something
        assert m[f"{name}/adaptive/acc"] == m[f"{name}/acc"]
        assert np.array_equal(outcomes[f"{name}/adaptive/acc"][0], outcomes[f"{name}/acc"][0])


def test_eot_on_a_deterministic_model_changes_nothing_and_is_recorded(small_trained, tmp_path):
    run_dir = copy_run(small_trained, tmp_path / "run")
    res = normlab.evaluate(run_dir, overrides=["evaluate={pgd: {n_examples: 64, eps: 0.12, steps: 5, eot: 3}}"],
                           quiet=True)
    again = normlab.evaluate(run_dir, overrides=["evaluate={pgd: {n_examples: 64, eps: 0.12, steps: 5}}"],
                             name="plain", quiet=True)
    assert res.metrics["pgd/eot"] == 3
    # three identical gradients per step have the sign of one; the random start is the same seed's
    assert again.metrics["plain/pgd/acc"] == res.metrics["pgd/acc"]
