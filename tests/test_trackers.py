"""Issue 14, item 6: the tensorboard and mlflow plugins record what the run wrote, through on_log."""

from __future__ import annotations

import csv
import json

import pytest

import normlab
from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = {"seed": 0, "model": {"name": TINY_MODEL},
           "data": {"name": "mnist", "batch_size": 64, "n_train": 128, "image_size": 16},
           "train": {"val_examples": 100, "epochs": 2, "lr": 0.05},
           "plugins": {"tensorboard": {}, "mlflow": {}},
           "evaluate": {"clean": {"n_examples": 100}, "fgsm": {"n_examples": 50, "eps": 0.1}}}
    return normlab.run(cfg, out=tmp_path_factory.mktemp("tracked") / "run", quiet=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_tensorboard_event_files_hold_the_logged_scalars_and_plots(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked.dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for i, row in enumerate(rows(tracked.dir)):
        for key in ("train_loss", "loss/ce", "val_acc"):
            event = [e for e in acc.Scalars(key) if e.step == i + 1]
            assert event and event[0].value == pytest.approx(float(row[key]), rel=1e-6)
    final = [e for e in acc.Scalars("clean/acc")]
    assert [e.step for e in final] == [2] and final[0].value == pytest.approx(tracked.metrics["clean/acc"])
    assert acc.Scalars("fgsm/acc/ci_low")[0].value == pytest.approx(tracked.metrics["fgsm/acc/ci_low"])
    assert "plots/training" in tags["images"]


def test_mlflow_run_holds_the_params_and_metrics(tracked):
    from mlflow.tracking import MlflowClient

    run_id = (tracked.dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient((tracked.dir / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.05" and run.data.params["data.n_train"] == "128"
    assert run.data.params["plugins.mlflow.experiment"] == "normlab"
    assert run.data.metrics["clean/acc"] == pytest.approx(tracked.metrics["clean/acc"])
    cost = json.loads((tracked.dir / "results.json").read_text())["cost"]
    assert run.data.metrics["cost/train/step_flops"] == pytest.approx(cost["train/step_flops"])
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, pytest.approx(m.value, rel=1e-6)) for m in history] == [
        (i + 1, float(r["train_loss"])) for i, r in enumerate(rows(tracked.dir))]
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/training.png"]


def test_a_later_evaluation_adds_to_the_same_mlflow_run(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    from conftest import copy_run

    d = copy_run(tracked, tmp_path / "run")
    normlab.evaluate(d, overrides=['evaluate={"clean": {"n_examples": 60}}'], name="small", quiet=True)
    run_id = (d / "mlflow_run_id").read_text().strip()
    metrics = MlflowClient((d / "mlruns").resolve().as_uri()).get_run(run_id).data.metrics
    results = json.loads((d / "results.json").read_text())["metrics"]
    assert metrics["small/clean/acc"] == pytest.approx(results["small/clean/acc"])
    assert metrics["clean/acc"] == pytest.approx(results["clean/acc"])  # the first evaluation's, kept
