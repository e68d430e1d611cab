"""Issue 14: intervals, paired tests, per-example outcomes and seed groups."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import normlab
from normlab import stats
from normlab.cli import main
from normlab.evals import Report
from normlab.results import read_outcomes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wilson_970_of_1000_equals_the_formula_and_scipys_independent_implementation():
    from scipy.stats import binomtest

    lo, hi = stats.wilson(970, 1000)
    z, p, n = 1.959963984540054, 0.97, 1000
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    ref = binomtest(970, 1000).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert (round(lo, 4), round(hi, 4)) == (0.9575, 0.9789)
    assert stats.wilson(0, 10)[0] == 0.0 and stats.wilson(10, 10)[1] == 1.0


def test_mcnemar_equals_the_exact_binomial_and_one_image_is_not_significant():
    a = np.array([1] * 8 + [0] * 2 + [1] * 50 + [0] * 40, dtype=bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 50 + [0] * 40, dtype=bool)
    r = stats.mcnemar(a, b)
    assert (r["only_a"], r["only_b"]) == (8, 2)
    # P[X <= 2] for X ~ binomial(10, 1/2) is (1 + 10 + 45) / 1024; two-sided: twice that
    assert r["p"] == pytest.approx(2 * 56 / 1024, abs=1e-12) and r["diff"] == pytest.approx(6 / 100)
    one = b.copy()
    one[-1] = True  # differ by one image
    assert stats.mcnemar(b, one)["p"] == 1.0 and stats.mcnemar(b, b)["p"] == 1.0
    lopsided = stats.mcnemar(np.ones(30, bool), np.zeros(30, bool))
    assert lopsided["p"] == pytest.approx(2 * 0.5 ** 30)


def test_seed_interval_and_mean_interval_equal_hand_computations():
    mean, lo, hi = stats.seed_interval([0.90, 0.92, 0.94])
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, 2 dof) * sd / sqrt(n)
    assert (mean, lo, hi) == pytest.approx((0.92, 0.92 - half, 0.92 + half), abs=1e-9)
    assert stats.seed_interval([0.5]) == (0.5, 0.5, 0.5)
    scores = np.array([1.0, 0.5, 0.0, 1.0])
    lo, hi = stats.mean_interval(scores)
    se = np.std(scores, ddof=1) / 2
    assert (lo, hi) == pytest.approx((max(0, 0.625 - 1.959963984540054 * se), min(1, 0.625 + 1.959963984540054 * se)))
    paired = stats.paired_seeds([0.91, 0.93, 0.95], [0.90, 0.92, 0.94])
    assert paired["diff"] == pytest.approx(0.01) and paired["p"] == 0.0  # every seed up by the same amount


def test_report_accuracy_and_the_mean_of_accuracies_over_the_same_examples():
    labels = np.arange(200) % 10
    a = np.arange(200) % 4 != 0  # 150 of 200
    b = np.arange(200) % 2 == 0  # 100 of 200
    r = Report()
    r.accuracy("style/x/acc", a, labels)
    r.accuracy("style/y/acc", b, labels)
    assert r.metrics["style/x/acc"] == 0.75
    assert (r.metrics["style/x/acc/ci_low"], r.metrics["style/x/acc/ci_high"]) == stats.wilson(150, 200)
    r.mean_accuracy("style/acc", ["style/x/acc", "style/y/acc"])
    assert r.metrics["style/acc"] == pytest.approx(0.625)
    scores = (a.astype(float) + b) / 2
    assert (r.metrics["style/acc/ci_low"], r.metrics["style/acc/ci_high"]) == pytest.approx(
        stats.mean_interval(scores))
    one = Report()  # an average of one accuracy is that accuracy: Wilson's interval, not the normal one
    one.accuracy("style/x/acc", a, labels)
    one.mean_accuracy("style/acc", ["style/x/acc"])
    assert (one.metrics["style/acc/ci_low"], one.metrics["style/acc/ci_high"]) == stats.wilson(150, 200)
    assert stats.mean_interval(np.array([0.5])) == (0.0, 1.0)  # one example: no spread to estimate
    assert math.isnan(stats.paired_examples(np.array([1.0]), np.array([0.5]))["p"])  # and no test
    other = Report()  # other examples: the mean is added without an interval
    other.accuracy("a", a, labels)
    other.accuracy("b", b[:100], labels[:100])
    other.mean_accuracy("m", ["a", "b"])
    assert other.metrics["m"] == pytest.approx((0.75 + 0.5) / 2) and "m/ci_low" not in other.metrics


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Two tiny runs that differ only in their seed, with clean and style accuracies."""
    tmp = tmp_path_factory.mktemp("paired")
    out = {}
    for seed in (1, 2):
        cfg = {"seed": seed, "model": {"name": "resnet18"},
               "data": {"name": "mnist", "batch_size": 64, "n_train": 256, "image_size": 16},
               "train": {"val_examples": 100, "epochs": 1, "lr": 0.05},
               "evaluate": {"clean": {"n_examples": 300}, "style": {"n_examples": 300, "domains": ["invert", "color"]}}}
        out[seed] = normlab.run(cfg, out=tmp / f"s{seed}", quiet=True)
    return out


def test_results_hold_intervals_and_packed_per_example_outcomes(two_seeds):
    res = two_seeds[1]
    m = res.metrics
    k = round(m["clean/acc"] * 300)
    assert (m["clean/acc/ci_low"], m["clean/acc/ci_high"]) == pytest.approx(stats.wilson(k, 300), abs=1e-12)
    raw = load_file(str(res.dir / "correct.safetensors"))
    assert raw["clean/acc"].dtype == np.uint8 and raw["clean/acc"].size == math.ceil(300 / 8)
    outcomes = read_outcomes(res.dir)
    scores, examples, binary, parts = outcomes["clean/acc"]
    assert binary and parts == () and scores.size == 300 and scores.mean() == pytest.approx(m["clean/acc"], abs=1e-12)
    avg, _, binary, parts = outcomes["style/acc"]  # an average: rebuilt from its parts
    assert not binary and avg.mean() == pytest.approx(m["style/acc"], abs=1e-12)
    assert parts == (("style/invert/acc", ()), ("style/color/acc", ()))
    assert examples == outcomes["style/invert/acc"][1]  # the same 300 test images


def test_compare_reports_mcnemar_on_the_same_images(two_seeds, capsys):
    a, b = two_seeds[1], two_seeds[2]
    assert main(["compare", str(a.dir), str(b.dir), "--keys", "clean/acc,style/acc"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("clean/acc"))
    oa, ob = read_outcomes(a.dir)["clean/acc"][0] > 0.5, read_outcomes(b.dir)["clean/acc"][0] > 0.5
    expected = stats.mcnemar(ob, oa)
    assert f"p={expected['p']:.3g}" in row and f"{b.metrics['clean/acc'] - a.metrics['clean/acc']:+.4f}" in row
    assert row.rstrip().endswith("*" if expected["p"] < 0.05 else "n.s.")
    assert "McNemar exact" in out and "paired t over examples" in out
    assert main(["compare", str(a.dir), str(a.dir), "--keys", "clean/acc"]) == 0  # the same run: no difference
    assert "+0.0000 p=1 n.s." in capsys.readouterr().out
    # a key no run holds (a typo) is refused, not shown as a row of dashes
    assert main(["compare", str(a.dir), str(b.dir), "--keys", "clean/acc,clean/acuracy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--keys 'clean/acc,clean/acuracy': 'clean/acuracy' is in none of the runs" in err[0]
    assert "they hold: clean/acc, " in err[0] and "ci_low" not in err[0]


def test_an_evaluation_stored_under_a_name_keeps_its_outcomes(two_seeds, tmp_path, capsys):
    from conftest import copy_run

    d = copy_run(two_seeds[1], tmp_path / "run")
    normlab.evaluate(d, overrides=['evaluate={"clean": {"n_examples": 300}}'], name="again", quiet=True)
    outcomes = read_outcomes(d)
    assert np.array_equal(outcomes["again/clean/acc"][0], outcomes["clean/acc"][0])  # deterministic eval
    assert main(["compare", str(d), f"{d}:again", "--keys", "clean/acc"]) == 0
    assert "+0.0000 p=1 n.s." in capsys.readouterr().out


def test_compare_tests_an_average_of_one_part_as_an_accuracy_and_not_averages_over_other_parts(
        two_seeds, tmp_path, capsys):
    from conftest import copy_run

    a, b = (copy_run(two_seeds[s], tmp_path / f"s{s}") for s in (1, 2))
    one = 'evaluate={"style": {"n_examples": 300, "domains": ["color"]}}'
    for d in (a, b):
        normlab.evaluate(d, overrides=[one], name="one", quiet=True)
    assert main(["compare", f"{a}:one", f"{b}:one", "--keys", "style/acc,style/color/acc"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("style/")}
    oa, ob = (read_outcomes(d)["one/style/color/acc"][0] > 0.5 for d in (a, b))
    p = stats.mcnemar(ob, oa)["p"]
    assert f"p={p:.3g}" in rows["style/acc"] and f"p={p:.3g}" in rows["style/color/acc"]  # McNemar for both
    # style/acc over two domains against style/acc over one: the same name, not the same measurement
    assert main(["compare", str(a), f"{a}:one", "--keys", "style/acc"]) == 0
    out = capsys.readouterr().out
    assert "untested" in next(line for line in out.splitlines() if line.startswith("style/acc"))
    assert "the averages are over different parts" in out
    # the same domains in another order are the same average: tested (paired t over examples)
    normlab.evaluate(b, overrides=['evaluate={"style": {"n_examples": 300, "domains": ["color", "invert"]}}'],
                     name="swapped", quiet=True)
    assert main(["compare", str(a), f"{b}:swapped", "--keys", "style/acc"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("style/acc"))
    assert "untested" not in row and "p=" in row


def test_seed_groups_pair_by_seed_whatever_the_order(tmp_path, capsys):
    values = {"a": {0: 0.90, 1: 0.93, 2: 0.91}, "b": {0: 0.92, 1: 0.93, 2: 0.95}}
    for name, order in (("a", [0, 1, 2]), ("b", [2, 0, 1])):
        d = tmp_path / name
        d.mkdir()
        vs = [values[name][s] for s in order]
        mean, lo, hi = stats.seed_interval(vs)
        (d / "group.yaml").write_text(yaml.safe_dump({"seeds": order}))
        (d / "group.json").write_text(json.dumps({"seeds": order, "metrics": {"clean/acc": {
            "values": vs, "mean": mean, "ci_low": lo, "ci_high": hi}}}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--keys", "clean/acc"]) == 0
    out = capsys.readouterr().out
    p = stats.paired_seeds([0.92, 0.93, 0.95], [0.90, 0.93, 0.91])["p"]
    assert "paired t over seeds" in out and f"p={p:.3g}" in out


def test_seed_group_summarises_its_runs_and_resumes(tiny_config, tmp_path, write_yaml, capsys):
    cfg = dict(tiny_config)  # its seed (1) is replaced by the group's seeds
    cfg["train"] = {**cfg["train"], "epochs": 1, "val_examples": 100}
    cfg["seeds"] = [0, 1]
    path = write_yaml(cfg)
    out = tmp_path / "group"
    assert main(["run", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    group = json.loads((out / "group.json").read_text())
    runs = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1]
    values = [r["metrics"]["clean/acc"] for r in runs]
    assert group["metrics"]["clean/acc"]["values"] == values
    mean, lo, hi = stats.seed_interval(values)
    assert group["metrics"]["clean/acc"]["mean"] == pytest.approx(np.mean(values), abs=1e-12) == mean
    stored = group["metrics"]["clean/acc"]
    assert (stored["ci_low"], stored["ci_high"]) == (max(lo, 0), min(hi, 1))
    assert "clean/acc/ci_low" not in group["metrics"]  # per-example intervals stay in each run
    assert f"{mean:.4f}  [{max(lo, 0):.4f}, {min(hi, 1):.4f}]" in printed and "seed group:" in printed
    assert main(["show", str(out)]) == 0 and f"{mean:.4f}" in capsys.readouterr().out
    assert yaml.safe_load((out / "group.yaml").read_text())["seeds"] == [0, 1]
    # a group interrupted after its first seed: --resume leaves seed 0 alone and reruns seed 1
    finished = (out / "seed-0" / "results.json").stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "seed-1")
    (out / "group.json").unlink()
    assert main(["run", str(path), "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    assert (out / "seed-0" / "results.json").stat().st_mtime_ns == finished
    assert json.loads((out / "group.json").read_text())["metrics"]["clean/acc"]["values"] == values
    # groups compare with a paired t-test over seeds
    assert main(["compare", str(out), str(out), "--keys", "clean/acc"]) == 0
    assert "paired t over seeds" in capsys.readouterr().out
    assert main(["run", str(path), "--out", str(out), "--resume", "--set", "seeds=[0, 2]"]) == 2
    assert "started with seeds [0, 1], not [0, 2]" in capsys.readouterr().err
    # a seed run evaluated again: the group's summary follows it (it kept the old value)
    normlab.evaluate(out / "seed-0", overrides=['evaluate={"clean": {"n_examples": 50}}'], quiet=True)
    again = [json.loads((out / f"seed-{s}" / "results.json").read_text())["metrics"]["clean/acc"] for s in (0, 1)]
    assert json.loads((out / "group.json").read_text())["metrics"]["clean/acc"]["values"] == again
    assert again[0] != values[0] and again[1] == values[1]  # 50 images now (a multiple of 1/50), seed 1 as it was
    values = again
    # a group.yaml written before a setting existed (a key with its default missing) still resumes
    older = yaml.safe_load((out / "group.yaml").read_text())
    del older["model"]["stem"]
    (out / "group.yaml").write_text(yaml.safe_dump(older))
    assert main(["run", str(path), "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    # other settings: the finished seeds would be averaged with runs of another learning rate
    assert main(["run", str(path), "--out", str(out), "--resume", "--set", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "--set train.lr=0.5: train.lr: the group being resumed has " in err and "this run file 0.5" in err
    assert json.loads((out / "group.json").read_text())["metrics"]["clean/acc"]["values"] == values  # untouched


@pytest.mark.parametrize("text, pattern", [
    ("seeds: [0, 0]", r"seeds: each seed once, got \[0, 0\]"),
    ("seeds: []", r"seeds: List should have at least 1 item"),
])
def test_bad_seeds_are_refused(text, pattern, tmp_path, capsys):
    import re

    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert re.search(pattern, capsys.readouterr().err) and not (tmp_path / "o").exists()


def test_a_damaged_outcomes_file_is_one_line(two_seeds, tmp_path, capsys):
    from conftest import copy_run

    d = copy_run(two_seeds[1], tmp_path / "run")
    (d / "correct.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["compare", str(d), str(two_seeds[2].dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "correct.safetensors: unreadable" in err[0]


def test_cost_flops_of_a_resnet18_step_match_an_independent_count_and_are_reported(tmp_path):
    """train/step_flops (torch's FlopCounterMode on the first step) equals a count from the layers' shapes:
    forward 2 * N * C_out * H_out * W_out * C_in * kh * kw per conv (2 * N * in * out per linear), backward
    twice that (input and weight gradients) except the first conv's input gradient, which nothing needs.
    kh x kw are the kernel taps that meet the input somewhere (normlab.layers.taps skips the others, which
    meet only padding): found here as the extent of the nonzero taps of the kernel gradient of an all-ones
    input and output gradient."""
    import torch
    from torch import nn
    from torch.nn.grad import conv2d_weight

    cfg = {"seed": 0, "model": {"name": "resnet18"},
           "data": {"name": "mnist", "batch_size": 128, "n_train": 128, "image_size": 32},
           "train": {"val_examples": 100, "epochs": 1, "lr": 0.05},
           "evaluate": {"clean": {"n_examples": 100}, "fgsm": {"n_examples": 50}}}
    res = normlab.run(cfg, out=tmp_path / "r", quiet=True)
    cost = json.loads((res.dir / "results.json").read_text())["cost"]
    forward: list[float] = []

    def count(mod, inputs, out):
        if isinstance(mod, nn.Conv2d):
            x = torch.ones(1, 1, *inputs[0].shape[-2:])
            g = conv2d_weight(x, (1, 1, *mod.kernel_size), torch.ones(1, 1, *out.shape[-2:]), mod.stride,
                              mod.padding, mod.dilation)[0, 0] != 0
            rows, cols = g.any(1).nonzero(), g.any(0).nonzero()
            taps = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            forward.append(2.0 * out.numel() * int(taps) * mod.in_channels // mod.groups)
        else:
            forward.append(2.0 * inputs[0].shape[0] * mod.in_features * mod.out_features)

    model = res.model
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.rand(128, 3, 32, 32))
    for h in handles:
        h.remove()
    expected = 3 * sum(forward) - forward[0]
    assert cost["train/step_flops"] == pytest.approx(expected, rel=1e-9)
    # resnet18's 1.82 GMACs at 224 px scale by (32/224)^2 to about 37 MMACs an image forward; at 32 px layer4's
    # maps are 1x1 (2x2 into its first conv), where its 3x3 convs meet the input with 1 (4) taps of 9: 7 MMACs
    # fewer, about 30 MMACs an image forward: 3 x 2 x 30e6 x 128
    assert 2.1e10 < expected < 2.4e10
    # the timings are recorded, not bounded (bounds on time and memory live in benchmarks/); the per-image
    # figure divides by the images evaluated (fgsm's n_examples), not by the split's 1,000
    assert {"train/images_per_s", "peak_memory_mb", "eval/fgsm/seconds"} <= set(cost)
    assert cost["eval/fgsm/seconds_per_image"] == pytest.approx(cost["eval/fgsm/seconds"] / 50)


def test_run_yaml_records_provenance(two_seeds):
    """Issue 14, item 5: package versions, the git commit of this checkout and content hashes of the splits."""
    import hashlib
    import importlib.metadata as md
    import subprocess
    from pathlib import Path

    from normlab.data import embedded_mnist

    versions = yaml.safe_load((two_seeds[1].dir / "run.yaml").read_text())["versions"]
    for dist in ("timm", "torchattacks", "pyautoattack", "robustbench", "imagecorruptions"):
        assert versions[dist] == md.version(dist)
    train, test = embedded_mnist()
    for name, split in (("train", train), ("test", test)):
        digest = hashlib.sha256(split.images.numpy().tobytes() + split.labels.numpy().astype(np.int64).tobytes())
        assert versions["data"][name] == f"sha256:{digest.hexdigest()}"
    here = Path(__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI clones one)
        assert versions["git"].split("+")[0] == head.stdout.strip()


def test_a_group_json_with_non_numeric_values_is_one_usage_error(tmp_path):
    from normlab.errors import UsageError
    from normlab.group import read_group

    entry = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "values": ["a", "b"]}
    (tmp_path / "group.json").write_text(json.dumps({"seeds": [0, 1], "metrics": {"clean/acc": entry}}))
    with pytest.raises(UsageError, match=r"group.json: metrics.clean/acc: expected mean, ci_low, ci_high and one "
                                         r"number per seed"):
        read_group(tmp_path)
    entry["values"] = [0.4, 0.6]
    (tmp_path / "group.json").write_text(json.dumps({"seeds": [0, 1], "metrics": {"clean/acc": entry}}))
    assert read_group(tmp_path)["metrics"]["clean/acc"]["values"] == [0.4, 0.6]
