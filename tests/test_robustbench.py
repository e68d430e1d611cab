"""robustbench: a zoo model as the backbone (offline, from robustbench's model_dir) and the `robustbench` evaluator.

The zoo entry used is the smallest CIFAR-10 one, Hendrycks2020AugMix_WRN
(threat model corruptions; WRN-40-2, 2.2M parameters). Its checkpoint is made
here from the zoo's own constructor (random weights) and saved the way
robustbench's checkpoints are: ``{"state_dict": {"module.<key>": tensor}}``.
No test touches the network: sockets refuse to connect and robustbench's
downloader raises.
"""

import json
import pickle
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import normlab
from conftest import input_batch_stats
from normlab.cli import main
from normlab.errors import UsageError

ZOO = {"name": "Hendrycks2020AugMix_WRN", "dataset": "cifar10", "threat_model": "corruptions"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: a connect raises, and so does robustbench's checkpoint downloader."""
    from normlab.adapters.robustbench import import_robustbench

    import_robustbench()
    import robustbench.utils

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", refuse)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """robustbench's model_dir with ZOO's checkpoint at {model_dir}/cifar10/corruptions/{name}.pt."""
    from normlab.adapters.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.corruptions][ZOO["name"]]["model"]()
    folder = root / "cifar10" / "corruptions"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, folder / f"{ZOO['name']}.pt")
    return root


def zoo_config(model_dir, **evaluate):
    return {
        "seed": 0,
        "model": {"robustbench": {**ZOO, "model_dir": str(model_dir)}},
        "data": {"name": "mnist", "batch_size": 64},
        "train": {"epochs": 0, "threads": 1},
        "evaluate": evaluate or {"clean": {"n_examples": 64}},
    }


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- a zoo model as the backbone ------------------------------------------------

def test_zoo_model_loads_offline_and_is_the_backbone_unchanged(model_dir, tmp_path):
    from robustbench.utils import clean_accuracy, load_model

    from normlab.config import DataConfig
    from normlab.data import build_data

    res = normlab.run(zoo_config(model_dir), out=tmp_path / "r", quiet=True)
    results = json.loads((res.dir / "results.json").read_text())
    assert 0.0 <= results["metrics"]["clean/acc"] <= 1.0
    model = res.model.eval()
    # robustbench models normalise internally: normlab's Normalize is the identity
    assert torch.equal(model.normalize.mean, torch.zeros(1, 3, 1, 1))
    assert torch.equal(model.normalize.std, torch.ones(1, 3, 1, 1))
    # the same logits as robustbench's own model on the same [0, 1] inputs (the clean evaluator's images)
    own = load_model(ZOO["name"], model_dir=str(model_dir), dataset="cifar10", threat_model="corruptions").eval()
    assert type(model.backbone) is type(own)
    own.to(memory_format=model.memory_format)  # the run's layout (train.channels_last): the same kernels
    x, y = next(iter(build_data(DataConfig()).loader("test", 64, shuffle=False, n=64)))
    with torch.no_grad():
        assert torch.equal(model(x), own(x))
    assert res.metrics["clean/acc"] == pytest.approx(clean_accuracy(own, x, y, batch_size=64))
    # the run directory evaluates again from run.yaml (the checkpoint is still in model_dir)
    again = normlab.evaluate(res.dir, quiet=True)
    assert again.metrics["clean/acc"] == res.metrics["clean/acc"]


BAD = {
    "missing checkpoint": (
        "model: {robustbench: {name: Standard, dataset: cifar10, threat_model: Linf, model_dir: MODELS}}",
        r"run\.yaml: model\.robustbench\.name: no checkpoint for robustbench model 'Standard': expected "
        r"\S+/cifar10/Linf/Standard\.pt \(robustbench's layout"),
    "timm name with robustbench": (
        "model: {name: resnet50, robustbench: {name: Standard}}",
        r"run\.yaml: model\.robustbench: a robustbench zoo model replaces the timm backbone: leave model\.name, "
        r"model\.pretrained, model\.kwargs and model\.stem at their defaults \(got model\.name='resnet50'\)"),
    "pretrained with robustbench": (
        "model: {pretrained: true, robustbench: {name: Standard}}",
        r"run\.yaml: model\.robustbench: .*\(got model\.pretrained=True\)"),
    "unknown zoo name": (
        "model: {robustbench: {name: Standrd, model_dir: MODELS}}",
        r"run\.yaml: model\.robustbench\.name: 'Standrd' is not in robustbench's cifar10/Linf model zoo "
        r"\(did you mean 'Standard'\?\)"),
    "unknown zoo key": (
        "model: {robustbench: {name: Standard, treat_model: L2}}",
        # the hint needs config._owner to look through Optional[...] (it does not yet)
        r"run\.yaml: model\.robustbench\.treat_model: unknown key( \(did you mean 'threat_model'\?\))?$"),
    "bad threat model": (
        "model: {robustbench: {name: Standard, threat_model: Linf2}}",
        r"run\.yaml: model\.robustbench\.threat_model: Input should be 'Linf', 'L2' or 'corruptions'"),
    "class mismatch": (
        "model: {robustbench: {name: Gowal2020Uncovering, dataset: cifar100, model_dir: MODELS}}",
        r"run\.yaml: model\.robustbench\.dataset: a cifar100 zoo model has 100 classes but the run's data has 10"),
    "data mean with robustbench": (
        f"model: {{robustbench: {{name: {ZOO['name']}, threat_model: corruptions, model_dir: MODELS}}}}\n"
        "data: {mean: [0.5, 0.5, 0.5]}",
        r"run\.yaml: data\.mean: not used with model\.robustbench"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_robustbench_model_exits_2_with_one_line_and_no_run_dir(case, model_dir, tmp_path, write_yaml, capsys):
    text, pattern = BAD[case]
    path = write_yaml(text.replace("MODELS", str(model_dir)))
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["run", path, "--out", out_dir], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out_dir.exists()
    assert "Traceback" not in err
    # robustbench was not allowed to create its folders or fetch anything
    assert not (model_dir / "cifar10" / "Linf").exists()


def test_robustbench_none_is_a_timm_model_again(tiny_config, tmp_path):
    import timm

    from normlab.config import parse_run
    from normlab.runner import prepare

    cfg = parse_run({**tiny_config, "model": {"name": "resnet18", "robustbench": None}}, "config")
    assert cfg.model.robustbench is None
    run = prepare(cfg, "config", quiet=True)
    run.build()
    backbone, reference = run.model.backbone, timm.create_model("resnet18", num_classes=10)
    assert type(backbone) is type(reference)
    assert {k: v.shape for k, v in backbone.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


# --- the evaluator --------------------------------------------------------------

def small_run(cifar=None, **robustbench):
    """A test_resnet trained briefly on the embedded digits (or on the fake CIFAR-10 under ``cifar``), evaluated
    by `robustbench` (seconds on CPU)."""
    data = {"name": "mnist", "batch_size": 64, "n_train": 512} if cifar is None else \
        {"name": "cifar10", "root": str(cifar), "batch_size": 16, "n_train": 64}
    return {
        "seed": 1,
        "model": {"name": "test_resnet"},
        "data": data,
        "train": {"val_examples": 100 if cifar is None else 16, "epochs": 1, "lr": 0.05, "threads": 1},
        "evaluate": {"robustbench": {"n_examples": 8, "batch_size": 8, "eps": 0.3, **robustbench}},
    }


def write_fake_cifar10(root, n=40, seed=0):
    """torchvision's CIFAR-10 files (random images, n per batch); their md5 sums cannot match, see `fake_cifar`."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:  # the training batches: for a run on it
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """A CIFAR-10 in data_dir that torchvision accepts (its md5 check is an existence check for the test)."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    return write_fake_cifar10(tmp_path / "data")


@pytest.fixture
def fixed_adapter(monkeypatch):
    """The adapter as benchmark() needs it: run_standard_evaluation returns the adversarial images only."""
    from normlab.adapters.autoattack import AutoAttack
    from normlab.evals.robustbench import adapter_problem

    original = AutoAttack.run_standard_evaluation

    def run_standard_evaluation(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return out[0] if isinstance(out, tuple) and not kwargs.get("return_labels") else out

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", run_standard_evaluation)
    adapter_problem.cache_clear()
    yield
    adapter_problem.cache_clear()


def test_what_benchmark_needs_from_the_autoattack_module(monkeypatch):
    """The probe reproduces both failures: pyautoattack as is, and the adapter's (x_adv, y_adv) return."""
    import pyautoattack
    import robustbench.eval

    from normlab.adapters.autoattack import AutoAttack
    from normlab.evals.robustbench import adapter_problem

    adapter_problem.cache_clear()
    try:
        assert robustbench.eval.AutoAttack is AutoAttack  # robustbench imports normlab's adapter
        problem = adapter_problem()
        assert problem is None or "returns a tuple" in problem, problem
        monkeypatch.setattr(robustbench.eval, "AutoAttack", pyautoattack.AutoAttack)
        adapter_problem.cache_clear()
        assert "unexpected keyword argument 'log_path'" in adapter_problem()
    finally:
        adapter_problem.cache_clear()


def test_equivalent_on_the_runs_own_split(tmp_path):
    res = normlab.run(small_run(version="fast"), out=tmp_path / "r", quiet=True)
    m = res.metrics
    assert m["robustbench/used_benchmark"] == 0.0 and m["robustbench/benchmark_data"] == 0.0
    assert m["robustbench/n"] == 8 and m["robustbench/eps"] == 0.3
    assert 0.0 <= m["robustbench/adv_acc"] <= m["robustbench/clean_acc"] <= 1.0
    assert m["robustbench/fast/adv_acc"] == m["robustbench/adv_acc"]
    from normlab.stats import wilson

    for key in ("robustbench/clean_acc", "robustbench/adv_acc", "robustbench/fast/adv_acc"):  # Wilson, 8 images
        assert (m[f"{key}/ci_low"], m[f"{key}/ci_high"]) == wilson(round(m[key] * 8), 8)
    log = (res.dir / "log.txt").read_text()
    assert "robustbench: equivalent path (the run's data is not a robustbench dataset" in log
    records = json.loads((res.dir / "results.json").read_text()).get("records")
    if records is not None:  # where the host keeps non-numeric records
        assert records["robustbench"]["path"] == "equivalent"


def test_benchmark_runs_where_it_works_and_the_equivalent_gives_the_same_clean_accuracy(
        tmp_path, fake_cifar, fixed_adapter):
    cfg = small_run(fake_cifar, dataset="cifar10", data_dir=str(fake_cifar), n_examples=16, batch_size=16)
    res = normlab.run(cfg, out=tmp_path / "bench", quiet=True)
    m = res.metrics
    assert m["robustbench/used_benchmark"] == 1.0 and m["robustbench/benchmark_data"] == 1.0
    assert m["robustbench/n"] == 16
    assert 0.0 <= m["robustbench/adv_acc"] <= m["robustbench/clean_acc"]
    assert "Clean accuracy:" in (res.dir / "log.txt").read_text()  # benchmark()'s own output, logged
    # fast is not benchmark()'s version: the equivalent runs, on the same robustbench images
    again = normlab.evaluate(res.dir, overrides=["evaluate.robustbench.version=fast"], quiet=True).metrics
    assert again["robustbench/used_benchmark"] == 0.0 and again["robustbench/benchmark_data"] == 1.0
    assert again["robustbench/clean_acc"] == m["robustbench/clean_acc"]
    assert again["robustbench/adv_acc"] <= again["robustbench/clean_acc"]
    # more than the benchmark set holds: all of it, and the log says so
    more = normlab.evaluate(res.dir, overrides=["evaluate.robustbench={version: fast, n_examples: 100, eps: 0.03, "
                                                f"dataset: cifar10, data_dir: {fake_cifar}}}"], quiet=True).metrics
    assert more["robustbench/n"] == 40 and more["robustbench/benchmark_data"] == 1.0
    assert "evaluate.robustbench.n_examples: 100 asked, but robustbench's cifar10 test set has 40 images: all 40 " \
           "are evaluated" in (res.dir / "log.txt").read_text()


def test_evaluator_refuses_another_dataset_than_the_runs_before_training(tmp_path, fake_cifar, write_yaml, capsys):
    """robustbench's CIFAR-10 numbers for a digits model would be CIFAR images through it, or (without them)
    the digits at CIFAR's budget: refused before anything is written, as any bad run file."""
    path = write_yaml(small_run(dataset="cifar10"))
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"normlab: error: {path}: evaluate.robustbench.dataset: cifar10, but the run trains on mnist; " \
                  "expected it unset (mnist is not robustbench's: the run's own test split is evaluated at mnist's " \
                  "budget)"
    assert not (tmp_path / "r").exists()
    with pytest.raises(UsageError, match=r"evaluate\.robustbench\.dataset: cifar100, but the run trains on "
                                         r"cifar10; expected cifar10 or unset$"):
        normlab.run(small_run(fake_cifar, dataset="cifar100"), out=tmp_path / "r", quiet=True)


def test_evaluator_rejects_a_dataset_with_other_classes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # an image folder may hold any benchmark's images, but not with 2 classes
        for c in range(2):
            d = tmp_path / "imgs" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    cfg = small_run(dataset="cifar10")
    cfg["data"] = {"name": "imagefolder", "root": str(tmp_path / "imgs"), "image_size": 32, "batch_size": 4}
    cfg["train"]["val_examples"] = 2
    with pytest.raises(UsageError, match=r"evaluate\.robustbench\.dataset: cifar10 has 10 classes but the model "
                                         r"has 2"):
        normlab.run(cfg, out=tmp_path / "r", quiet=True)


def test_corruptions_need_the_real_data(tmp_path, fake_cifar):
    (tmp_path / "none").mkdir()  # a data_dir that does not exist is refused by its settings
    with pytest.raises(UsageError, match=r"evaluate\.robustbench\.data_dir: threat_model 'corruptions' needs "
                                         r"robustbench's CIFAR-10-C under \S+ \(normlab does not download it"):
        normlab.run(small_run(fake_cifar, threat_model="corruptions", data_dir=str(tmp_path / "none"),
                              eps=None), out=tmp_path / "r", quiet=True)


def test_corruptions_through_robustbenchs_loader(tmp_path, monkeypatch, fake_cifar):
    """CIFAR-10-C in robustbench's layout (one corruption, to keep the files small) read by load_cifar10c."""
    import robustbench.data

    monkeypatch.setattr(robustbench.data, "CORRUPTIONS", ("fog",))
    root = fake_cifar / "CIFAR-10-C"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.tile(rng.integers(0, 10, 10000).astype(np.uint8), 5)
    np.save(root / "labels.npy", labels)
    images = np.zeros((50000, 32, 32, 3), dtype=np.uint8)
    for s in range(5):  # severity s+1 holds rows s*10000 ..: mark each severity with its own brightness
        images[s * 10000:(s + 1) * 10000] = 40 * s
    np.save(root / "fog.npy", images)
    cfg = small_run(fake_cifar, threat_model="corruptions", data_dir=str(fake_cifar), eps=None, n_examples=8)
    m = normlab.run(cfg, out=tmp_path / "r", quiet=True).metrics
    accs = [m[f"robustbench/corruptions/fog/{s}/acc"] for s in range(1, 6)]
    assert m["robustbench/adv_acc"] == pytest.approx(sum(accs) / 5)
    assert m["robustbench/used_benchmark"] == 0.0  # no model_info/ AlexNet file in the current directory
    assert "robustbench/eps" not in m


@pytest.mark.slow
def test_zoo_model_evaluated_by_robustbench(model_dir, tmp_path):
    """The zoo backbone through the `robustbench` evaluator (the equivalent path: no CIFAR-10 here)."""
    cfg = zoo_config(model_dir, clean={"n_examples": 16},
                     robustbench={"n_examples": 16, "batch_size": 16, "version": "fast", "eps": 0.3})
    res = normlab.run(cfg, out=tmp_path / "r", quiet=True)
    m = res.metrics
    assert m["robustbench/used_benchmark"] == 0.0
    assert m["robustbench/clean_acc"] == m["clean/acc"]  # the same 16 images of the embedded split
    assert 0.0 <= m["robustbench/adv_acc"] <= m["robustbench/clean_acc"]


def test_bnrect_rectifies_a_zoo_model(model_dir):
    """BN rectification on a robustbench zoo model: every BN takes the adaptation batch's statistics."""
    bnrect = pytest.importorskip("normlab_bnrect")
    from robustbench.utils import load_model

    model = load_model(ZOO["name"], model_dir=str(model_dir), dataset="cifar10", threat_model="corruptions").eval()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    x = torch.rand(32, 3, 32, 32) * 0.5
    seen = input_batch_stats(model, x)  # independently, from hooks on a train-mode copy
    # the reference code's form (one train-mode forward) is what a train-mode copy's hooks see
    undo, used, skipped, n = bnrect.rectify(model, x, bnrect.Config(estimate="batch"))
    assert bns and n == 32 and len(used) == len(bns) and not skipped
    for name, m in bns.items():
        torch.testing.assert_close(m.running_mean, seen[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, seen[name][1], rtol=1e-4, atol=1e-5)
    undo()
    assert all(torch.equal(m.running_mean, before[k][0]) and torch.equal(m.running_var, before[k][1])
               for k, m in bns.items())
