"""An MLflow run for each normlab run, through the host's ``on_log`` hook.

The run file (every default filled in, flattened to ``train.lr``, ``plugins.pgd.eps``, ...) is
logged as parameters, every number of each epoch's ``metrics.csv`` row as a metric at step
``epoch + 1``, each final metric (intervals as ``clean/acc.ci_low``; the run's cost as
``cost/...``: images per second, FLOPs) at the last epoch's step, and with ``plots: true`` each PNG of ``RUN_DIR/plots`` as an artifact. The MLflow
run's id is kept in ``RUN_DIR/mlflow_run_id``, so a resumed run and ``normlab eval`` add to the
same MLflow run.

The tracking URI is any the user sets (``tracking_uri``, else ``MLFLOW_TRACKING_URI``), by default
a local file store in ``RUN_DIR/mlruns``. Recent MLflow releases refuse the file store unless
``MLFLOW_ALLOW_FILE_STORE=true``; the plugin sets that opt-in for the default store it chose, and
only then (the smallest adapter: MLflow's own server backends need a database).
"""

from __future__ import annotations

import os
from pathlib import Path

from normlab import hookimpl

from .settings import Config

requires = ()
conflicts = ()
after = ()
knobs = ()

RUN_ID = "mlflow_run_id"


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow bounds a parameter's value
    return out


def _client(run):
    from mlflow.tracking import MlflowClient

    cfg: Config = run.plugin_config("mlflow")
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        uri = (Path(run.dir) / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(uri)
    id_file = Path(run.dir) / RUN_ID
    if id_file.is_file():
        return client, id_file.read_text().strip()
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    mlrun = client.create_run(experiment_id, run_name=cfg.run_name or Path(run.dir).name)
    params = _flatten(run.resolved())
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(mlrun.info.run_id, params=items[i:i + 100])
    id_file.write_text(mlrun.info.run_id)
    return client, mlrun.info.run_id


def _key(key: str) -> str:
    """An MLflow metric name: letters, digits, _ - . / and spaces (sweep labels have = and ,), and an
    interval as ``clean/acc.ci_low``: the file store keeps ``clean/acc`` as a file, so nothing may
    live under ``clean/acc/``."""
    for end in ("/ci_low", "/ci_high"):
        if key.endswith(end):
            key = key[: -len(end)] + "." + end[1:]
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


@hookimpl
def on_log(ctx, metrics, plots):
    import time

    from mlflow.entities import Metric

    run = ctx.run
    client, run_id = _client(run)
    step = ctx.epoch + 1 if ctx.epoch is not None else run.config.train.epochs
    stamp = int(time.time() * 1000)
    values = {k: v for k, v in metrics.items() if k != "epoch"}
    if ctx.epoch is None:
        values.update({f"cost/{k}": v for k, v in run.cost.items()})
    batch = [Metric(_key(k), float(v), stamp, step) for k, v in values.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])
    if ctx.epoch is None and run.plugin_config("mlflow").plots:
        for path in plots.values():
            client.log_artifact(run_id, path, artifact_path="plots")
