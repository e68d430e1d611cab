"""Adversarial evaluators: numbers that can be wrong (ordering across eps and attacks), and what attacks must
not touch (BN statistics, modes, gradients, the global RNG).

One small model is trained once for the module; evaluators are then called
directly on it, or through ``normlab.evaluate`` for the run-file contract.
"""

import json

import pytest
import torch

import normlab
from normlab.cli import main
from normlab.config import validate_section
from normlab.context import Context
from normlab.errors import RunFailure, UsageError
from normlab.evals import EVALUATORS, Report
from normlab.evals.attacks import default_eps
from normlab.runner import _from_run_dir

CONFIG = {
    "seed": 1,
    # timm's test_resnet (15 BN layers, 0.4 M parameters): ~95% clean in ~7 s here, and attacks run 4-8x faster
    # than on resnet18 (AutoAttack fast on 100 images: ~10 s instead of minutes)
    "model": {"name": "test_resnet"},
    "data": {"name": "mnist", "batch_size": 64, "n_train": 2000},
    "train": {"val_examples": 100, "epochs": 3, "lr": 0.05, "warmup_epochs": 0.5},
    "evaluate": {"clean": {"n_examples": 200}},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """(run directory, a loaded Run with the trained model in eval mode)."""
    res = normlab.run(CONFIG, out=tmp_path_factory.mktemp("attacks") / "run", quiet=True)
    assert res.metrics["clean/acc"] > 0.85  # attacks on a model that learned nothing prove nothing
    r = _from_run_dir(res.dir, (), None, True)
    r.model.eval()
    return res.dir, r


def evaluate(run, name, report=None, **settings):
    """Run evaluator ``name`` directly with ``settings``; return its metrics (``report``: the Report to fill)."""
    cfg = validate_section(EVALUATORS[name].config, settings, "test", f"evaluate.{name}")
    report = Report() if report is None else report
    EVALUATORS[name].fn(run.model, Context(run=run), report, cfg)
    return report.metrics


def bn_state(model):
    return {n: b.clone() for n, b in model.named_buffers()
            if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def test_pgd_accuracy_falls_with_eps_and_is_at_most_fgsm(trained):
    _, run = trained
    clean = evaluate(run, "clean", n_examples=100)["clean/acc"]
    pgd, fgsm = {}, {}
    for eps in (0.0, 0.05, 0.1, 0.2):
        m = evaluate(run, "pgd", n_examples=100, eps=eps, steps=10)
        f = evaluate(run, "fgsm", n_examples=100, eps=eps)
        # the same 100 images every time, and their clean accuracy is the clean evaluator's
        assert m["pgd/clean_acc"] == f["fgsm/clean_acc"] == clean
        assert m["pgd/eps"] == f["fgsm/eps"] == eps
        pgd[eps], fgsm[eps] = m["pgd/acc"], f["fgsm/acc"]
    assert pgd[0.0] == fgsm[0.0] == clean  # no budget, no change
    accs = [pgd[e] for e in sorted(pgd)]
    assert all(a >= b for a, b in zip(accs, accs[1:])), pgd
    assert all(pgd[e] <= fgsm[e] for e in pgd), (pgd, fgsm)
    assert pgd[0.1] < clean - 0.2 and pgd[0.2] < 0.1, pgd  # the attack works at all


def test_l2_pgd_and_the_other_torchattacks_attacks_are_bounded_by_clean_accuracy(trained):
    _, run = trained
    small = evaluate(run, "pgd", n_examples=50, norm="L2", eps=0.5, steps=5)
    large = evaluate(run, "pgd", n_examples=50, norm="L2", eps=2.0, steps=5)
    assert large["pgd/acc"] <= small["pgd/acc"] <= small["pgd/clean_acc"]
    assert large["pgd/acc"] < large["pgd/clean_acc"]
    mi = evaluate(run, "mifgsm", n_examples=50, eps=0.1)
    assert mi["mifgsm/acc"] < mi["mifgsm/clean_acc"] == small["pgd/clean_acc"]
    # CW counts an example against a budget only when it is inside it
    free = evaluate(run, "cw", n_examples=50, steps=20)
    tight = evaluate(run, "cw", n_examples=50, steps=20, eps=1e-3)
    assert free["cw/acc"] <= tight["cw/acc"] == tight["cw/clean_acc"]
    assert ("cw/l2" in free) == (free["cw/acc"] < free["cw/clean_acc"])


@pytest.mark.slow
def test_autoattack_fast_is_at_most_pgd_at_the_same_eps(trained):
    _, run = trained
    pgd = evaluate(run, "pgd", n_examples=50, eps=0.05)  # default PGD-20, step 2.5 * eps / 20
    aa = evaluate(run, "autoattack", n_examples=50, eps=0.05, version="fast")
    assert pgd["pgd/acc"] > 0.1  # a budget where the comparison says something (here PGD leaves ~25%)
    assert aa["autoattack/clean_acc"] == pgd["pgd/clean_acc"]
    assert aa["autoattack/acc"] == aa["autoattack/fast/acc"]
    assert aa["autoattack/acc"] <= pgd["pgd/acc"], (aa, pgd)
    assert aa["autoattack/eps"] == 0.05


CHEAP = {
    "fgsm": {"eps": 0.1},
    "pgd": {"eps": 0.1, "steps": 2},
    "mifgsm": {"eps": 0.1, "steps": 2},
    "cw": {"steps": 3},
    "apgd": {"eps": 0.1, "steps": 3},
    "apgd_dlr": {"eps": 0.1, "steps": 3},
    "square": {"eps": 0.1, "n_queries": 5},
    "autoattack": {"eps": 0.3, "version": "fast"},  # 100 iterations per APGD: keep the subset tiny
}


def test_every_attack_evaluator_is_registered_and_checked_below():
    from normlab.evals import attacks

    assert {e.name for e in attacks.EVALUATORS} == set(CHEAP)
    assert all(EVALUATORS[e.name] is e for e in attacks.EVALUATORS)


@pytest.mark.parametrize("name", list(CHEAP))
def test_attacks_leave_bn_statistics_modes_gradients_and_rng_alone(trained, name):
    _, run = trained
    model = run.model
    # enter in train mode with one BN layer frozen (as train_mode does for frozen prefixes): both must come back
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    before = bn_state(model)
    rng = torch.get_rng_state()
    try:
        n = 8 if name == "autoattack" else 16
        metrics = evaluate(run, name, n_examples=n, batch_size=n, **CHEAP[name])
        after = {n: m.training for n, m in model.named_modules()}
        assert after == modes
        for key, value in bn_state(model).items():
            assert torch.equal(value, before[key]), key  # bitwise, num_batches_tracked included
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
        assert torch.equal(torch.get_rng_state(), rng)
        assert 0.0 <= metrics[f"{name}/acc"] <= metrics[f"{name}/clean_acc"] <= 1.0
    finally:
        model.eval()


def test_torchattacks_autoattack_only_by_name_and_labelled(trained):
    _, run = trained
    m = evaluate(run, "autoattack", n_examples=16, eps=0.3, implementation="torchattacks")
    accuracies = {"autoattack/acc", "autoattack/clean_acc", "autoattack/torchattacks-standard/acc"}
    assert set(m) == {"autoattack/eps"} | {f"{k}{end}" for k in accuracies for end in ("", "/ci_low", "/ci_high")}
    assert m["autoattack/acc"] == m["autoattack/torchattacks-standard/acc"]
    # the same 16 fixed test images as the clean evaluator's, and no attack raises accuracy
    assert m["autoattack/clean_acc"] == evaluate(run, "clean", n_examples=16)["clean/acc"]
    assert m["autoattack/acc"] <= m["autoattack/clean_acc"]
    assert EVALUATORS["autoattack"].config().implementation == "pyautoattack"
    assert "10 iterations" in EVALUATORS["autoattack"].doc


def test_same_seed_same_numbers_and_the_seed_matters(trained):
    _, run = trained
    a = evaluate(run, "pgd", n_examples=50, eps=0.05, steps=3)
    b = evaluate(run, "pgd", n_examples=50, eps=0.05, steps=3)
    assert a == b
    # which examples a random-search attack breaks depends on its seed (an attack strong enough to break
    # about half of them: whether a weak one breaks any at all depends on the trained model's rounding)
    outcomes = []
    for s in range(4):
        evaluate(run, "square", report := Report(), n_examples=50, eps=0.15, n_queries=40, seed=s)
        outcomes.append(tuple(report.outcomes["square/acc"].scores.tolist()))
    assert len(set(outcomes)) > 1, outcomes
    again = Report()
    evaluate(run, "square", again, n_examples=50, eps=0.15, n_queries=40, seed=3)
    assert tuple(again.outcomes["square/acc"].scores.tolist()) == outcomes[3]  # and the same seed, the same ones


class _Fake:
    """Stands in for torchattacks.FGSM: a broken attack the evaluator must catch."""

    def __init__(self, how):
        self.how = how

    def __call__(self, model, eps):
        how = self.how

        class Attack:
            def set_device(self, device):
                pass

            def __call__(self, x, y):
                if how == "moves_bn":
                    model.train()
                    model(x)
                    return x
                if how == "too_far":
                    return (x + 2 * eps).clamp(0, 1)
                return x + 0.5  # leaves [0, 1]

        return Attack()


@pytest.mark.parametrize("how,match", [("moves_bn", "changed model buffers"), ("too_far", "exceeds eps"),
                                       ("out_of_range", r"leave \[0, 1\]")])
def test_a_broken_attack_is_a_failure_not_a_number(trained, monkeypatch, how, match):
    import torchattacks

    _, run = trained
    monkeypatch.setattr(torchattacks, "FGSM", _Fake(how))
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    try:
        with pytest.raises(RunFailure, match=match):
            evaluate(run, "fgsm", n_examples=16, eps=0.1)
    finally:
        run.model.load_state_dict(state)
        run.model.eval()


def test_results_json_has_the_keys_and_the_default_budget(trained):
    run_dir, _ = trained
    res = normlab.evaluate(run_dir, quiet=True, overrides=[
        "evaluate.fgsm.n_examples=20", "evaluate.fgsm.eps=8/255", "evaluate.pgd.n_examples=20", "evaluate.pgd.steps=2",
        "evaluate.autoattack.n_examples=4", "evaluate.autoattack.version=fast"])
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    for key in ("clean/acc", "fgsm/acc", "fgsm/clean_acc", "fgsm/eps", "pgd/acc", "pgd/clean_acc", "pgd/eps",
                "autoattack/acc", "autoattack/fast/acc", "autoattack/clean_acc", "autoattack/eps"):
        assert key in metrics and metrics[key] == res.metrics[key], key
    assert metrics["pgd/eps"] == metrics["autoattack/eps"] == default_eps("mnist", "Linf") == 0.3
    assert metrics["fgsm/eps"] == 8 / 255  # budgets may be written as fractions
    assert default_eps("cifar10", "Linf") == 8 / 255 and default_eps("cifar10", "L2") == 0.5


@pytest.mark.parametrize("setting,message", [
    ("evaluate.pgd.epz=0.1", "evaluate.pgd.epz: unknown key (did you mean 'eps'?)"),
    ("evaluate.pgd.eps=-1", "evaluate.pgd.eps: Input should be greater than or equal to 0"),
    ("evaluate.pgd.eps=8/0", "evaluate.pgd.eps: expected a number or a fraction such as 8/255"),
    ("evaluate.pgd.norm=L3", "evaluate.pgd.norm: Input should be 'Linf' or 'L2'"),
    ("evaluate.autoattack={implementation: torchattacks, version: fast}",
     "evaluate.autoattack: version 'fast' exists only for implementation 'pyautoattack'"),
    ("evaluate.autoattack.norm=L1", "evaluate.autoattack: norm 'L1' has no default budget: set eps"),
    ("evaluate.pgd.eps=8", "evaluate.pgd: eps: a Linf budget above 1 is no budget"),  # 8 meant as 8/255
    ("evaluate.fgsm.eps=1.5", "evaluate.fgsm: eps: a Linf budget above 1 is no budget"),
    ("evaluate.robustbench.eps=4", "evaluate.robustbench: eps: a Linf budget above 1 is no budget"),
])
def test_bad_settings_are_usage_errors_naming_the_key(trained, setting, message, capsys):
    run_dir, _ = trained
    with pytest.raises(UsageError) as e:
        normlab.evaluate(run_dir, overrides=[setting], quiet=True)
    assert message in str(e.value)
    assert main(["eval", str(run_dir), "--set", setting]) == 2
    assert message in capsys.readouterr().err


def test_only_linf_budgets_are_bounded_by_one():
    from normlab.evals.settings import validate

    assert validate("autoattack", {"norm": "L1", "eps": 12}, "run.yaml", "evaluate.autoattack").eps == 12
    assert validate("apgd", {"norm": "L2", "eps": 3}, "run.yaml", "evaluate.apgd").eps == 3
    assert validate("pgd", {"eps": 1}, "run.yaml", "evaluate.pgd").eps == 1  # the whole box: a sanity check
    with pytest.raises(UsageError, match=r"^run\.yaml: evaluate\.square: eps: a Linf budget above 1"):
        validate("square", {"eps": 2}, "run.yaml", "evaluate.square")


def test_attacks_run_inside_the_test_time_adaptation_of_the_clean_domain(trained):
    pytest.importorskip("normlab_bnrect")
    run_dir, _ = trained
    run = _from_run_dir(run_dir, ["plugins.bnrect.domains=[clean]"], None, True)
    run.model.eval()
    before = bn_state(run.model)
    pgd = evaluate(run, "pgd", n_examples=100, batch_size=50, eps=0.05, steps=5)
    clean = evaluate(run, "clean", n_examples=100, batch_size=50)
    # both adapted on the same first batch, so the attacked model is the one the clean evaluator measures;
    # the adaptation is not mistaken for an attack that moved BN statistics, and it is undone afterwards
    assert pgd["pgd/clean_acc"] == clean["clean/acc"]
    assert pgd["pgd/acc"] < clean["clean/acc"]
    after = bn_state(run.model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_n_examples_above_the_test_split_evaluates_all_of_it_and_says_so(trained):
    run_dir, run = trained
    total = len(run.data.test)
    m = normlab.evaluate(run_dir, overrides=[f"evaluate.clean.n_examples={10 * total}"], quiet=True).metrics
    whole = normlab.evaluate(run_dir, overrides=[f"evaluate.clean.n_examples={total}"], quiet=True).metrics
    assert m["clean/acc"] == whole["clean/acc"] and m["clean/acc/ci_low"] == whole["clean/acc/ci_low"]
    log = (run_dir / "log.txt").read_text()
    assert f"evaluate.clean.n_examples: {10 * total} asked, but the test split has {total} images: all {total} " \
           "are evaluated" in log
    normlab.evaluate(run_dir, overrides=[f'evaluate={{"style": {{"n_examples": {10 * total}, '
                                         '"domains": ["invert", "color"]}}'], quiet=True)
    told = (run_dir / "log.txt").read_text()[len(log):]
    assert told.count(f"evaluate.style.n_examples: {10 * total} asked") == 1  # once, not once per domain
