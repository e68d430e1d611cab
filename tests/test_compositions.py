"""The composition cases of DESIGN.md section 5, end to end on tiny runs: each trains, and each
plugin's part shows in numbers (loss terms, frozen parts, which BN layers were rectified)."""

import csv
import json

import pytest
import torch

import normlab
from conftest import TINY_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # torch threads restored after


def tiny(plugins, evaluate=None, **train):
    return {"seed": 0, "model": {"name": TINY_MODEL}, "data": {"n_train": 128, "batch_size": 64},
            "train": {"val_examples": 100, "epochs": 1, "lr": 0.02, "warmup_epochs": 0, **train}, "plugins": plugins,
            "evaluate": evaluate if evaluate is not None else {"clean": {"n_examples": 64}}}


def last_row(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


def test_augmix_with_advbn_trains_the_tail_on_jsd_plus_the_adversarial_term(tmp_path):
    cfg = tiny({"augmix": {"views": 2, "workers": 0}, "advbn": {"steps": 2, "samples": "clean"}})
    before = normlab.run({**cfg, "train": {**cfg["train"], "epochs": 0}}, out=tmp_path / "init", quiet=True)
    res = normlab.run(cfg, out=tmp_path / "r", quiet=True)
    row = last_row(res.dir)
    assert float(row["loss/ce"]) > 0 and float(row["loss/advbn"]) > 0  # JSD replaced ce; advbn added
    start, end = before.model.state_dict(), res.model.state_dict()
    front = [k for k in start if k.split(".")[1] in ("conv1", "bn1", "layer1")]
    tail = [k for k in start if k.startswith("backbone.layer4") and k.endswith("weight")]
    assert front and all(torch.equal(start[k], end[k]) for k in front)  # the front is frozen, BN stats too
    assert any(not torch.equal(start[k], end[k]) for k in tail)


class LossTerms:
    """Records, at each step's on_loss (run last), every term's weight, rows and the step's total."""

    def __init__(self):
        self.steps = []

    @normlab.hookimpl
    def on_loss(self, batch, model, ctx, terms):
        self.steps.append({"weights": {k: float(w) for k, w in terms.weights.items()},
                           "rows": {k: len(v) for k, v in terms.losses.items()},
                           "mean_over_rows": float(torch.cat([v.detach() for v in terms.losses.values()]).mean()),
                           "total": float(terms.total().detach())})


def test_nofrost_star_averages_clean_augmented_and_adversarial_ce(tmp_path):
    """NoFrost*: the equal-weight mean of CE over the clean, the AugMix and the adversarial rows, i.e.
    ce over 2N rows weighs 2N / 3N and adv over N rows N / 3N, and the step's loss is the plain mean of
    the 3N per-row CEs."""
    recorder = LossTerms()
    cfg = tiny({"nf": {}, "pgd": {"combine": "mean", "attack_rows": "clean", "eps": 0.1, "step_size": 0.05,
                                  "steps": 2},
                "augmix": {"views": 1, "loss": "ce", "workers": 0}, "loss_terms": {}})
    res = normlab.run(cfg, out=tmp_path / "r", plugins={"loss_terms": recorder}, quiet=True)
    assert len(recorder.steps) == 2  # 128 digits at batch 64
    for step in recorder.steps:
        assert step["rows"] == {"ce": 128, "adv": 64}
        assert step["weights"] == pytest.approx({"ce": 2 / 3, "adv": 1 / 3})
        assert step["total"] == pytest.approx(step["mean_over_rows"], rel=1e-6)
    row = last_row(res.dir)
    assert float(row["train_loss"]) == pytest.approx(float(row["loss/ce"]) + float(row["loss/adv"]), rel=1e-6)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in res.model.modules())


def test_advbn_with_bnrect_rectifies_the_front_and_the_route_in_use(tmp_path):
    cfg = tiny({"advbn": {"steps": 1, "route": "aux"}, "bnrect": {"n_samples": 16}},
               evaluate={"style": {"n_examples": 64, "domains": ["invert"]}}, epochs=0)
    res = normlab.run(cfg, out=tmp_path / "r", quiet=True)
    bns = [n for n, m in res.model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    aux = [n for n in bns if ".routes.1" in n]
    main = [n for n in bns if ".routes.0" in n]
    plain = [n for n in bns if ".routes." not in n]  # the front's BN layers
    assert aux and len(aux) == len(main) and plain
    record = json.loads((res.dir / "results.json").read_text())["records"]["bnrect"]["domains"]["style/invert"]
    assert record == {"n_samples": 16, "bn_layers": len(plain) + len(aux)}


class FrontProbe:
    """At on_loss: how far advbn's kept front feature is from the front of the batch the host trained on."""

    def __init__(self):
        self.differences = []

    @normlab.hookimpl
    def on_loss(self, batch, model, ctx, terms):
        from normlab.layers import Split

        with torch.no_grad():  # the front is frozen, its BNs in eval mode: deterministic
            host = Split(model, "layer1").front(batch.x)
        self.differences.append(float((ctx.state["advbn"] - host).abs().max()))


def test_advbn_with_pgd_perturbs_the_host_forwards_features_not_the_attacks(tmp_path):
    """pgd's pure mode attacks in on_batch, before the host forward: advbn must keep the host forward's
    layer1 output (ctx.inner is set in the attack's forwards), not the first one of the step."""
    probe = FrontProbe()
    cfg = tiny({"advbn": {"steps": 1}, "pgd": {"steps": 2, "eps": 0.3, "step_size": 0.1}, "probe": {}})
    normlab.run(cfg, out=tmp_path / "r", plugins={"probe": probe}, quiet=True)
    assert len(probe.differences) == 2 and max(probe.differences) == 0.0


class StatsBefore:
    @normlab.hookimpl
    def on_domain(self, model, domain, samples, ctx):
        self.training = model.training
        self.before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}


class StatsAfter:
    def __init__(self, before):
        self.before, self.seen = before, []

    @normlab.hookimpl
    def on_domain(self, model, domain, samples, ctx):
        changed = sum(not torch.equal(b, self.before.before[n]) for n, b in model.named_buffers() if n in self.before.before)
        self.seen.append((domain, self.before.training, changed))


def test_validation_adapts_in_eval_mode_and_leaves_the_statistics_alone(tmp_path):
    """The per-epoch validation enters the clean domain with the model in eval mode: advbn's route: auto
    forwards the adaptation samples to choose a route without moving any BN's running statistics."""
    before = StatsBefore()
    after = StatsAfter(before)
    cfg = tiny({"before": {}, "advbn": {"steps": 1, "route": "auto"}, "after": {}})
    normlab.run(cfg, out=tmp_path / "r", plugins={"before": before, "after": after}, quiet=True)
    assert [d for d, *_ in after.seen] == ["clean", "clean"]  # validation after epoch 1, then the clean evaluator
    assert all(not training and changed == 0 for _, training, changed in after.seen), after.seen
