"""Crashes, concurrency and bad run directories (issue 16): one clear line, exit 2, or a clean resume."""

from __future__ import annotations

import json
import os
import re

import pytest

import normlab
from normlab import hookimpl
from normlab.cli import main
from normlab.errors import UsageError
from normlab.runner import LOCK, _try_lock
from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


class InterruptAt:
    """Raises KeyboardInterrupt (as Ctrl-C does) at global step ``step``, once."""

    def __init__(self, step: int):
        self.step, self.fired = step, False

    @hookimpl
    def on_batch(self, batch, ctx):
        if ctx.step == self.step and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (2 epochs of 4 steps) and its config."""
    cfg = {"seed": 1, "model": {"name": TINY_MODEL},
           "train": {"val_examples": 100, "epochs": 2, "lr": 0.05, "threads": 1},
           "data": {"name": "mnist", "batch_size": 64, "n_train": 256, "image_size": 16},
           "evaluate": {"clean": {"n_examples": 200}}}
    out = tmp_path_factory.mktemp("finished") / "run"
    return cfg, normlab.run(cfg, out=out, quiet=True)


def test_interrupted_in_the_first_epoch_resumes_from_epoch_0_to_the_same_result(finished, tmp_path):
    cfg, ref = finished
    cfg = {**cfg, "plugins": {"interrupt": {}}}  # its on_batch changes nothing until it fires
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        normlab.run(cfg, out=out, plugins={"interrupt": InterruptAt(2)}, quiet=True)
    assert (out / "run.yaml").is_file() and not (out / "checkpoints" / "last.json").exists()
    assert (out / "log.txt").read_text().strip().splitlines()[-1].endswith("interrupted; continue with --resume")
    partial = out / "checkpoints" / ".epoch-0001.abc123"  # what a kill during a checkpoint write leaves
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    # interrupted again during the resume, in the second epoch (global step 5), then resumed once more
    with pytest.raises(KeyboardInterrupt):
        normlab.run(cfg, out=out, resume=True, plugins={"interrupt": InterruptAt(5)}, quiet=True)
    assert not partial.exists() and "starting over from epoch 0" in (out / "log.txt").read_text()
    assert json.loads((out / "checkpoints" / "last.json").read_text())["epoch"] == 1
    res = normlab.run(cfg, out=out, resume=True, plugins={"interrupt": InterruptAt(-1)}, quiet=True)
    assert res.metrics == ref.metrics


def test_a_second_process_on_the_same_run_directory_exits_2_naming_the_holder(finished, tmp_path, capsys):
    cfg, ref = finished
    path = tmp_path / "run.yaml"
    path.write_text("seed: 0\ntrain: {epochs: 1}\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    fd = _try_lock(busy)  # this process holds it, as a running `normlab run` would
    assert isinstance(fd, int)
    try:
        code, _, err = cli(["run", path, "--out", busy], capsys)
        assert code == 2 and f"another normlab process (pid {os.getpid()}) is using this run directory" in err
        assert sorted(p.name for p in busy.iterdir()) == [LOCK]  # nothing written
        code, _, err = cli(["eval", ref.dir], capsys)
        assert code == 0, err
    finally:
        os.close(fd)
    code, _, err = cli(["run", path, "--out", busy, "--set", "data.n_train=128", "--set", "data.image_size=16",
                        "--set", "evaluate.clean.n_examples=50"], capsys)
    assert code == 0, err  # the lock file alone does not make the directory "not empty"
    damaged = _copy(ref.dir, tmp_path / "damaged")
    (damaged / LOCK).unlink(missing_ok=True)
    (damaged / LOCK).mkdir()  # a folder where the lock file goes
    fresh = tmp_path / "fresh"
    (fresh / LOCK).mkdir(parents=True)
    for args in (["eval", damaged], ["run", path, "--out", fresh]):
        code, _, err = cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"{args[-1] / LOCK}: cannot open the run " \
            "directory's lock file (Is a directory)" in err, (args, err)


def _copy(run_dir, dest):
    import shutil

    shutil.copytree(run_dir, dest)
    return dest


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "results.json").write_text("{not json"), r"results.json: not valid JSON"),
    (lambda d: (d / "results.json").write_text('{"metrics": {"clean/acc": "high"}}'),
     r"results.json: metrics.clean/acc: expected a finite number, got 'high'"),
    (lambda d: (d / "results.json").write_text('[1, 2]'), r"results.json: expected an object with a `metrics`"),
    (lambda d: (d / "results.json").write_text('{"metrics": {}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     r"results.json: not a normlab results file \(nested too deeply\)"),
    (lambda d: (d / "results.json").write_text('{"metrics": {"clean/acc": 0.5}, "timing": {"train": "fast"}}'),
     r"results.json: timing.train: expected a finite number, got 'fast'"),
])
def test_show_and_eval_refuse_a_corrupt_results_json_before_evaluating(finished, tmp_path, capsys, damage, pattern):
    _, ref = finished
    d = _copy(ref.dir, tmp_path / "run")
    damage(d)
    before = (d / "results.json").read_bytes()
    for args in (["show", d], ["eval", d], ["compare", d, ref.dir]):
        code, _, err = cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and re.search(pattern, lines[0]), (args, err)
    assert (d / "results.json").read_bytes() == before


def _epoch_dir(d):
    return d / "checkpoints" / json.loads((d / "checkpoints" / "last.json").read_text())["dir"]


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "checkpoints" / "last.json").write_text('{"dir": "../../etc"}'),
     r"last.json: not a normlab checkpoint pointer"),
    (lambda d: (_epoch_dir(d) / "state.json").write_text('{"epoch": "two"}'),
     r"state.json: expected an object with an integer `epoch`"),
    (lambda d: (_epoch_dir(d) / "state.json").write_text("[" * 100_000 + "]" * 100_000),
     r"state.json: unreadable \(RecursionError"),
    (lambda d: (_epoch_dir(d) / "state.json").write_text(json.dumps(
        {**json.loads((_epoch_dir(d) / "state.json").read_text()),
         "rng": {**json.loads((_epoch_dir(d) / "state.json").read_text())["rng"], "torch": "AAAA"}})),
     r"state.json: wrong scheduler or RNG state \(RuntimeError"),
    (lambda d: (_epoch_dir(d) / "optimizer.safetensors").write_bytes(
        (_epoch_dir(d) / "optimizer.safetensors").read_bytes()[:100]),
     r"optimizer.safetensors: unreadable .*truncated or corrupt"),
    (lambda d: (_epoch_dir(d) / "model.safetensors").write_bytes(
        (_epoch_dir(d) / "model.safetensors").read_bytes()[:1000]),
     r"model.safetensors: unreadable .*truncated or corrupt"),
])
def test_resume_from_a_damaged_checkpoint_exits_2_naming_the_file(finished, tmp_path, capsys, damage, pattern):
    cfg, ref = finished
    d = _copy(ref.dir, tmp_path / "run")
    damage(d)
    code, _, err = cli(["run", d / "run.yaml", "--out", d, "--resume", "--set", "train.epochs=3"], capsys)
    errors = [line for line in err.strip().splitlines() if line.startswith("normlab: error:")]
    assert code == 2 and len(errors) == 1 and re.search(pattern, errors[0]), err  # (the rest: progress lines)
    assert "Traceback" not in err


def test_weights_that_do_not_fit_name_the_tensors_and_shapes(finished, tmp_path):
    from safetensors.torch import load_file, save_file

    from normlab.errors import UsageError

    cfg, ref = finished
    d = _copy(ref.dir, tmp_path / "run")
    path = _epoch_dir(d) / "model.safetensors"
    state = load_file(str(path))
    state["backbone.fc.weight"] = state["backbone.fc.weight"][:5]
    del state["backbone.bn1.running_mean"]
    save_file(state, str(path))
    with pytest.raises(UsageError, match=r"model.safetensors: does not fit the model built from run.yaml: "
                       r"1 missing \(e.g. backbone.bn1.running_mean\); 1 of the wrong shape, saved vs model "
                       r"\(e.g. backbone.fc.weight \(5, 96\) vs \(10, 96\)\)"):
        normlab.run(d / "run.yaml", out=d, resume=True, overrides=["train.epochs=3"], quiet=True)


def test_eval_with_a_set_that_changes_the_model_names_the_set(finished, capsys):
    _, ref = finished
    code, _, err = cli(["eval", ref.dir, "--set", "model.name=resnet18"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "model.safetensors: does not fit the model built from run.yaml and --set model.name=resnet18: " in err


class ReturnsInt:
    @hookimpl
    def on_model(self, model, run):
        return 3


class ReturnsText:
    @hookimpl
    def on_batch(self, batch, ctx):
        return "batch"


class ReturnsNarrowFeature:
    @hookimpl
    def on_model(self, model, run):
        run.request_feature("layer1")

    @hookimpl
    def on_feature(self, name, feature, ctx):
        return feature[:, :1]


def test_a_hook_returning_the_wrong_type_names_the_plugin_and_hook(finished, tmp_path):
    cfg = {**finished[0], "plugins": {"bad": {}}}
    with pytest.raises(UsageError, match=r"plugin 'bad' returned int from on_model; expected a torch.nn.Module"):
        normlab.run(cfg, out=tmp_path / "a", plugins={"bad": ReturnsInt()}, quiet=True)
    with pytest.raises(UsageError, match=r"plugin 'bad' returned str from on_batch; expected a normlab.data.Batch"):
        normlab.run(cfg, out=tmp_path / "b", plugins={"bad": ReturnsText()}, quiet=True)
    assert (tmp_path / "b" / "log.txt").read_text().strip().splitlines()[-1].endswith(
        "error: plugin 'bad' returned str from on_batch; expected a normlab.data.Batch or None")
    # a tensor of another shape than the feature it replaces (it failed later, in the next convolution)
    with pytest.raises(UsageError, match=r"plugin 'bad' returned a tensor of shape \(\d+, 1, \d+, \d+\) for layer "
                                         r"layer1 \(its output: \(\d+, \d+, \d+, \d+\)\) from on_feature; "
                                         r"expected a torch.Tensor of the feature's shape"):
        normlab.run(cfg, out=tmp_path / "c", plugins={"bad": ReturnsNarrowFeature()}, quiet=True)


def test_a_kill_between_the_checkpoint_and_metrics_csv_is_repaired_on_resume(finished, tmp_path):
    """The last epoch's checkpoint is written before metrics.csv: a kill between the two leaves the file a row
    short, and --resume (which then has no epoch left to train) rewrites it from the checkpoint's history."""
    import csv

    cfg, ref = finished
    d = _copy(ref.dir, tmp_path / "run")
    full = (d / "metrics.csv").read_text().splitlines()
    (d / "metrics.csv").write_text("\n".join(full[:-1]) + "\n")  # the epoch-2 row lost
    res = normlab.run(cfg, out=d, resume=True, quiet=True)
    rows = list(csv.DictReader((d / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and len(res.history) == 2
    assert float(rows[-1]["val_acc"]) == ref.history[-1]["val_acc"]


def test_a_run_directory_from_an_earlier_version_resumes(finished, tmp_path):
    """run.yaml written before a key existed (here: adapt_samples, model.stem) still matches the same run."""
    import yaml

    cfg, ref = finished
    d = _copy(ref.dir, tmp_path / "run")
    saved = yaml.safe_load((d / "run.yaml").read_text())
    del saved["adapt_samples"], saved["model"]["stem"]
    (d / "run.yaml").write_text(yaml.safe_dump(saved))
    res = normlab.run(cfg, out=d, resume=True, overrides=["train.epochs=3"], quiet=True)
    assert len(res.history) == 3
    assert res.history[:2] == ref.history  # epochs 1 and 2 were kept, not trained again
    assert "resuming after epoch 2" in (d / "log.txt").read_text()


class _Payload:
    """Unpickling this runs a shell command: what a hostile .pt checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_checkpoint_that_runs_code_is_refused_in_one_line_and_never_unpickled(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pt"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=4))
    path = tmp_path / "run.yaml"
    path.write_text(f"seed: 0\nmodel: {{name: {TINY_MODEL}, checkpoint: {evil}}}\ntrain: {{epochs: 1}}\n")
    code, _, err = cli(["run", path, "--out", tmp_path / "out"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err  # no torch warning about the pickle protocol beside it
    assert f"model.checkpoint: cannot read {str(evil)!r} as weights: a pickle that holds more than tensors" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
