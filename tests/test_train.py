"""Training runs end to end: hooks fire, seeds reproduce, resume matches, failures exit 1."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import normlab
from conftest import subprocess_env
from normlab.cli import main
from normlab.errors import RunFailure
from plugins_for_tests import NaNAt, Recorder


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_run_writes_the_run_directory(tiny_config, tmp_path):
    res = normlab.run(tiny_config, out=tmp_path / "r", quiet=True)
    d = res.dir
    for name in ("run.yaml", "results.json", "metrics.csv", "checkpoints/last.json", "log.txt", "plots/training.png"):
        assert (d / name).is_file(), name
    results = json.loads((d / "results.json").read_text())
    assert set(results) >= {"metrics", "timing", "plugins", "seed"}
    assert 0.0 <= results["metrics"]["clean/acc"] <= 1.0
    assert all(isinstance(v, float) for v in results["metrics"].values())
    rows = read_metrics(d)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # val_acc is scored on train.val_examples = 100 test images: the clean accuracy of the final model on
    # the first 100 of the split's fixed order
    again = normlab.evaluate(d, overrides=['evaluate={"clean": {"n_examples": 100}}'], name="v", quiet=True)
    assert float(rows[-1]["val_acc"]) == pytest.approx(again.metrics["v/clean/acc"], abs=1e-9)
    # the checkpoint holds exactly the model's tensors, and reloading reproduces the metric
    state = load_file(str(d / "checkpoints" / "epoch-0002" / "model.safetensors"))
    assert set(state) == set(res.model.state_dict())
    again = normlab.evaluate(d, quiet=True)
    assert again.metrics["clean/acc"] == res.metrics["clean/acc"]


def test_same_seed_same_metrics_and_different_seed_differs(tiny_config, tmp_path):
    tiny_config["train"]["epochs"] = 1  # one epoch of 4 steps shows it as well as two
    a = normlab.run(tiny_config, out=tmp_path / "a", quiet=True)
    b = normlab.run(tiny_config, out=tmp_path / "b", quiet=True)
    assert read_metrics(a.dir) and [r["train_loss"] for r in read_metrics(a.dir)] == [
        r["train_loss"] for r in read_metrics(b.dir)]
    assert a.metrics == b.metrics
    c = normlab.run(tiny_config, out=tmp_path / "c", overrides=["seed=2"], quiet=True)
    assert [r["train_loss"] for r in read_metrics(c.dir)] != [r["train_loss"] for r in read_metrics(a.dir)]


@pytest.mark.usefixtures("one_thread")
def test_killed_mid_epoch_and_resumed_matches_uninterrupted(tiny_config, tmp_path, write_yaml):
    tiny_config["train"]["epochs"] = 2  # killed in the second, resumed from the first's checkpoint
    tiny_config["train"]["threads"] = 1  # the same in the killed subprocess and here, whatever ran before
    tiny_config["plugins"] = {"killer": {}}
    path = write_yaml(tiny_config)
    ref = normlab.run(path, out=tmp_path / "ref", plugins={"killer": Killer()}, quiet=True)
    # kill -9 in the middle of the second epoch (epoch index 1, step 2 of 4)
    script = ("import normlab, plugins_for_tests as p; "
              f"normlab.run({str(path)!r}, out={str(tmp_path / 'cut')!r}, plugins={{'killer': p.Killer()}}, quiet=True)")
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(NORMLAB_TEST_KILL_AT="1:2"),
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cut = tmp_path / "cut"
    assert json.loads((cut / "checkpoints" / "last.json").read_text())["epoch"] == 1
    assert not (cut / "results.json").exists()
    res = normlab.run(path, out=cut, resume=True, plugins={"killer": Killer()}, quiet=True)
    assert res.metrics == ref.metrics
    ref_rows, cut_rows = read_metrics(ref.dir), read_metrics(cut)
    assert [r["train_loss"] for r in cut_rows] == [r["train_loss"] for r in ref_rows]
    assert [r["val_acc"] for r in cut_rows] == [r["val_acc"] for r in ref_rows]
    # the training time counts the epoch the killed process finished too (it counted the resumed part alone)
    stored = json.loads((cut / "results.json").read_text())
    assert stored["timing"]["train"] == pytest.approx(sum(float(r["seconds"]) for r in cut_rows))
    assert float(cut_rows[0]["seconds"]) > 0
    before = stored["cost"]["peak_memory_mb"]
    again = normlab.run(path, out=cut, resume=True, plugins={"killer": Killer()}, quiet=True)  # finished: evaluates
    stored = json.loads((again.dir / "results.json").read_text())
    assert stored["timing"]["train"] == pytest.approx(sum(float(r["seconds"]) for r in cut_rows))
    assert stored["cost"]["peak_memory_mb"] >= before  # the run's peak, not only this process's


def Killer():
    from plugins_for_tests import Killer as K

    return K()


def test_resume_refuses_a_different_run_file(tiny_config, tmp_path, write_yaml, capsys):
    path = write_yaml(tiny_config)
    normlab.run(path, out=tmp_path / "r", quiet=True)
    capsys.readouterr()  # its log lines, where an earlier test's CLI call left normlab's handler on stderr
    changed = write_yaml({**tiny_config, "train": {**tiny_config["train"], "lr": 0.3}}, "changed.yaml")
    code = main(["run", str(changed), "--out", str(tmp_path / "r"), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("r/run.yaml: train.lr: the run being resumed has 0.05, this run file 0.3; "
                                      "resume with the same settings (--set train.lr=...) or start a new run"), err
    assert len(err.splitlines()) == 1
    code = main(["run", str(changed), "--out", str(tmp_path / "r"), "--resume", "--set", "train.channels_last=true",
                 "--set", "evaluate.clean.n_examples=100"])
    err = capsys.readouterr().err.strip()  # the first difference, then how many more; named by the --set it came from
    assert code == 2 and err.endswith(
        "--set evaluate.clean.n_examples=100: evaluate.clean.n_examples: the run being resumed has 200, this run "
        "file 100 (and 2 more: train.channels_last, train.lr); resume with the same settings "
        "(--set evaluate.clean.n_examples=...) or start a new run"), err


def test_a_bad_set_value_is_named_by_its_flag(tiny_config, write_yaml, capsys, tmp_path):
    """The file is fine; the --set is what to fix."""
    path = write_yaml(tiny_config)
    for item, rest in (("data.batch_size=big", "data.batch_size: Input should be a valid integer"),
                       ("evaluate.clean.n_examples=0", "evaluate.clean.n_examples: Input should be greater than or "
                                                       "equal to 1"),
                       ("train={epochs: -1}", "train.epochs: Input should be greater than or equal to 0")):
        assert main(["run", str(path), "--out", str(tmp_path / "o"), "--set", item]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"normlab: error: --set {item}: {rest}") and len(err.splitlines()) == 1, err
    bad = write_yaml({**tiny_config, "data": {**tiny_config["data"], "nope": 1}}, "bad.yaml")
    assert main(["run", str(bad), "--out", str(tmp_path / "o"), "--set", "data.batch_size=32"]) == 2
    assert capsys.readouterr().err.startswith(f"normlab: error: {bad}: data.nope: unknown key")  # the file's own


def test_loss_terms_name_the_plugin_that_last_set_them():
    from normlab.train import LossTerms

    running = ["pgd"]
    terms = LossTerms(owner=lambda: running[0])
    terms.add("adv", torch.ones(2))
    running[0] = None  # the host's own term
    terms.add("ce", torch.ones(2))
    running[0] = "trades"
    terms.reweight("adv", 0.5)
    assert terms.described("adv") == "adv (plugin 'trades')" and terms.described("ce") == "ce"
    assert float(terms.total()) == 1.5


def test_a_term_is_credited_to_its_plugin_when_its_hook_ran_another_plugins_hook():
    """pgd's on_loss runs the model, whose requested feature calls advbn's on_feature: the term pgd adds
    afterwards is still pgd's."""
    from normlab.manager import Hooks
    from normlab.train import LossTerms

    class Feature:
        @normlab.hookimpl
        def on_feature(self, name, feature, ctx):
            return None

    class Attack:
        @normlab.hookimpl
        def on_loss(self, batch, model, ctx, terms):
            hooks.call("on_feature", name="layer1", feature=torch.zeros(1), ctx=None)  # what model(x_adv) does
            terms.add("adv", torch.ones(2))

    hooks = Hooks([("feature", Feature()), ("attack", Attack())])
    terms = LossTerms(owner=lambda: hooks.current)
    hooks.call("on_loss", batch=None, model=None, ctx=None, terms=terms)
    assert terms.described("adv") == "adv (plugin 'attack')" and hooks.current is None


def test_non_finite_loss_stops_with_exit_1_naming_the_step(tiny_config, tmp_path):
    with pytest.raises(RunFailure, match=r"non-finite loss at epoch 1, step 4 \(global step 4\); not finite: "
                                         r"boom \(plugin 'nan'\)$"):
        normlab.run({**tiny_config, "plugins": {"nan": {}}}, out=tmp_path / "r", plugins={"nan": NaNAt()}, quiet=True)


def test_cli_exit_1_names_the_plugin_that_raised(tiny_config, tmp_path, write_yaml, monkeypatch, capsys):
    import normlab.cli as cli
    import normlab.runner as runner
    from plugins_for_tests import Raises

    path = write_yaml({**tiny_config, "plugins": ["raises"]})
    orig = runner.run
    monkeypatch.setattr(runner, "run", lambda *a, **k: orig(*a, plugins={"raises": Raises()}, **k))
    monkeypatch.setattr(cli, "precheck", lambda *a: None)  # the pre-check knows installed plugins only
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o")]) == 1  # the process's exit status
    assert "normlab: run failed: plugin 'raises' failed in on_batch: RuntimeError: deliberate" in \
        capsys.readouterr().err


def test_every_hook_fires_in_order(tiny_config, tmp_path):
    rec = Recorder()
    tiny_config["train"]["epochs"] = 1
    res = normlab.run({**tiny_config, "plugins": ["rec"]}, out=tmp_path / "r", plugins={"rec": rec}, quiet=True)
    calls = rec.calls
    assert calls[0] == "on_model"
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in res.model.modules())
    # test_resnet: 3 BNs in the stem, 9 in the blocks, 3 in the downsample paths
    assert sum(1 for c in calls if c[0] == "on_batch_norm") == n_bn == 15
    steps = 256 // 64
    assert calls.count("on_batch") == steps
    assert [c for c in calls if c[0] == "on_loss"] == [("on_loss", ("ce",))] * steps
    feats = [c for c in calls if c[0] == "on_feature"]
    side = tiny_config["data"]["image_size"] // 4  # test_resnet's layer1: 32 channels at stride 4
    assert feats[0] == ("on_feature", "layer1", (64, 32, side, side))
    # the clean evaluator's domain is the last one (the epoch's validation entered "clean" before);
    # its samples are the run's adapt_samples (128), whatever the evaluator's n_examples
    i_dom = len(calls) - 1 - calls[::-1].index(("on_domain", "clean", 128))
    assert calls.count(("on_domain", "clean", 128)) == 2
    # the clean evaluation (one batch of 200, features included) runs between adaptation and restore
    assert calls[i_dom + 1] == ("on_feature", "layer1", (200, 32, side, side))
    assert calls[i_dom + 2] == ("restore", "clean") and calls[-1] == "on_eval"
    assert res.metrics["recorder/seen"] == 1.0


def test_trainable_prefixes_freeze_the_rest(tiny_config, tmp_path):
    tiny_config["model"]["trainable"] = ["layer4", "fc"]
    res = normlab.run(tiny_config, out=tmp_path / "r", quiet=True)
    torch.manual_seed(tiny_config["seed"])
    import timm

    fresh = timm.create_model(tiny_config["model"]["name"], num_classes=10)
    trained = res.model.backbone.state_dict()
    for name, p in fresh.named_parameters():
        same = torch.equal(p, trained[name])
        assert same != (name.startswith("layer4.") or name.startswith("fc.")), name
    # BN statistics outside the trainable prefixes are left alone too
    for name, b in fresh.named_buffers():
        if "running" in name:
            assert torch.equal(b, trained[name]) != name.startswith("layer4."), name


def test_init_from_another_run_and_from_a_timm_state_dict(tiny_config, tmp_path):
    base = normlab.run(tiny_config, out=tmp_path / "base", quiet=True)
    cfg = {**tiny_config, "model": {**tiny_config["model"], "checkpoint": str(base.dir)},
           "train": {**tiny_config["train"], "epochs": 0}}
    again = normlab.run(cfg, out=tmp_path / "again", quiet=True)
    assert again.metrics["clean/acc"] == base.metrics["clean/acc"]
    torch.save(base.model.backbone.state_dict(), tmp_path / "w.pt")
    cfg["model"]["checkpoint"] = str(tmp_path / "w.pt")
    third = normlab.run(cfg, out=tmp_path / "third", quiet=True)
    assert third.metrics["clean/acc"] == base.metrics["clean/acc"]


def test_gradient_accumulation_takes_fewer_optimizer_steps(tiny_config, tmp_path):
    tiny_config["train"].update(epochs=1, schedule="constant", warmup_epochs=0)
    one = normlab.run(tiny_config, out=tmp_path / "one", quiet=True)
    two = normlab.run({**tiny_config, "train": {**tiny_config["train"], "accumulate": 2}}, out=tmp_path / "two",
                      quiet=True)
    s1 = json.loads((one.dir / "checkpoints/epoch-0001/state.json").read_text())["scheduler"]
    s2 = json.loads((two.dir / "checkpoints/epoch-0001/state.json").read_text())["scheduler"]
    assert (s1["last_epoch"], s2["last_epoch"]) == (4, 2)


def test_third_party_noise_plugin_by_name(tiny_config, tmp_path):
    """The example package is pip-installed; the run file names it; it changes training."""
    tiny_config["train"]["epochs"] = 1
    plain = normlab.run(tiny_config, out=tmp_path / "plain", quiet=True)
    noisy = normlab.run({**tiny_config, "plugins": {"noise": {"sigma": 0.3}}}, out=tmp_path / "noisy", quiet=True)
    assert json.loads((noisy.dir / "results.json").read_text())["plugins"] == {"noise": "0.1.0"}
    assert read_metrics(noisy.dir)[0]["train_loss"] != read_metrics(plain.dir)[0]["train_loss"]
    zero = normlab.run({**tiny_config, "plugins": {"noise": {"sigma": 0.0}}}, out=tmp_path / "zero", quiet=True)
    assert read_metrics(zero.dir)[0]["train_loss"] == read_metrics(plain.dir)[0]["train_loss"]


def test_noise_plugin_adds_noise_of_the_right_scale():
    from normlab.context import Context
    from normlab.data import Batch
    import normlab_noise

    class FakeRun:
        def plugin_config(self, name):
            return normlab_noise.Config(sigma=0.05)

    torch.manual_seed(0)
    x = torch.full((64, 3, 32, 32), 0.5)
    out = normlab_noise.on_batch(Batch(x.clone(), torch.zeros(64)), Context(run=FakeRun()))
    assert abs((out.x - 0.5).std().item() - 0.05) < 0.002
    assert out.x.min() >= 0 and out.x.max() <= 1


def test_accumulated_steps_average_their_batches_including_a_short_last_group(tmp_path):
    """accumulate: 3 over an epoch of 4 batches takes two optimizer steps, the mean gradient of batches
    0-2, then batch 3's own (not a third of it): the classifier's weights equal a hand-written SGD loop
    (only the classifier trains, so the frozen BNs are in eval mode and the batches are independent)."""
    import torch.nn.functional as F

    from normlab.config import parse_run
    from normlab.runner import prepare

    cfg = {"seed": 0, "model": {"name": "resnet18", "trainable": ["fc"]},
           "data": {"name": "mnist", "batch_size": 16, "n_train": 64, "image_size": 16},
           "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0,
                     "schedule": "constant", "warmup_epochs": 0, "accumulate": 3, "val_examples": 16},
           "evaluate": {}}
    trained = normlab.run(cfg, out=tmp_path / "run", quiet=True)
    run = prepare(parse_run({**cfg, "train": {**cfg["train"], "epochs": 0}}, "run.yaml"), "run.yaml", quiet=True)
    run.build()
    model = run.model
    run.trainable_parameters()
    run.train_mode()
    loader = run.data.loader("train", 16, seed=0, n=64, drop_last=True)
    loader.sampler.set_epoch(0)
    fc = model.backbone.fc
    batches = [(x, y) for x, y in loader]
    assert len(batches) == 4
    for group in (batches[:3], batches[3:]):
        grads = []
        for x, y in group:
            fc.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads.append((fc.weight.grad.clone(), fc.bias.grad.clone()))
        with torch.no_grad():
            fc.weight -= 0.5 * sum(g for g, _ in grads) / len(group)
            fc.bias -= 0.5 * sum(b for _, b in grads) / len(group)
    torch.testing.assert_close(trained.model.backbone.fc.weight, fc.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trained.model.backbone.fc.bias, fc.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amx", [False, True])
def test_channels_last_auto_follows_the_processor_and_the_model_is_built_in_that_layout(amx, monkeypatch, tiny_config):
    """train.channels_last: auto is channels-last on CUDA and on CPUs without AMX, contiguous on CPUs with it
    (measured: benchmarks/README.md); the built model's convolutions are in the chosen layout, and so are its
    inputs inside it."""
    from normlab import runner
    from normlab.config import parse_run

    monkeypatch.setattr(runner, "cpu_has_amx", lambda: amx)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runner.channels_last("auto", cpu) is (not amx) and runner.channels_last("auto", cuda) is True
    assert runner.channels_last("cuda", cpu) is False and runner.channels_last("cuda", cuda) is True
    assert runner.channels_last(True, cpu) is True and runner.channels_last(False, cuda) is False
    for setting, expected in (("auto", not amx), (True, True), (False, False)):
        cfg = {**tiny_config, "train": {**tiny_config["train"], "channels_last": setting, "device": "cpu"}}
        run = runner.prepare(parse_run(cfg, "run.yaml"), "run.yaml", quiet=True)
        run.build()
        weight = run.model.backbone.conv1[0].weight if isinstance(run.model.backbone.conv1, torch.nn.Sequential) \
            else run.model.backbone.conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is expected
        assert run.model.memory_format is (torch.channels_last if expected else torch.contiguous_format)
        assert run.versions()["memory_format"] == ("channels_last" if expected else "contiguous")
        assert run.versions()["device"] == "cpu"


def test_a_channels_last_model_gives_attacks_the_gradient_in_their_inputs_layout(tiny_config):
    """torchattacks ``view``s input gradients: a channels-last model hands a contiguous input's gradient back
    contiguous (it was channels-last, and L2 PGD, CW and AutoAttack raised), with the values of the model's
    own gradient."""
    import torchattacks

    from normlab import runner
    from normlab.config import parse_run

    cfg = {**tiny_config, "train": {**tiny_config["train"], "channels_last": True, "device": "cpu"}}
    run = runner.prepare(parse_run(cfg, "run.yaml"), "run.yaml", quiet=True)
    run.build()
    model = run.model.eval()
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    model(x).logsumexp(1).sum().backward()
    assert x.grad.is_contiguous() and x.grad.view(4, -1).shape == (4, 768)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    model(x_cl).logsumexp(1).sum().backward()
    assert torch.equal(x_cl.grad, x.grad)  # the model computes in one layout: the same numbers either way
    adv = torchattacks.PGDL2(model, eps=0.5, alpha=0.2, steps=2)(x.detach(), torch.arange(4))
    assert float((adv - x.detach()).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5


def test_eval_refuses_a_run_whose_training_has_not_finished(tiny_config, tmp_path, capsys):
    """normlab eval scores the last checkpoint: of an unfinished run that is not the trained model, and the
    results.json it wrote made the run look finished to show and launch."""
    import shutil

    res = normlab.run(tiny_config, out=tmp_path / "r", quiet=True)
    assert main(["eval", str(res.dir), "--quiet"]) == 0  # finished: evaluates again
    capsys.readouterr()
    cut = tmp_path / "cut"  # as killed in epoch 2: the epoch-1 checkpoint is the last, no results.json
    shutil.copytree(res.dir, cut)
    (cut / "results.json").unlink()
    ckpt = (cut / "checkpoints" / "epoch-0002").rename(cut / "checkpoints" / "epoch-0001")  # only the last is kept
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "epoch": 1}))
    (cut / "checkpoints" / "last.json").write_text(json.dumps({"dir": "epoch-0001", "epoch": 1}))
    assert main(["eval", str(cut), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{cut}: training has not finished (the last checkpoint is epoch 1 of 2); finish it first: "
                        f"normlab run RUN_FILE --out {cut} --resume") and len(err.splitlines()) == 1, err
    assert not (cut / "results.json").exists()
    shutil.rmtree(cut / "checkpoints")  # killed in epoch 1
    assert main(["eval", str(cut), "--quiet"]) == 2
    assert "no trained weights (checkpoints/last.json is missing" in capsys.readouterr().err
