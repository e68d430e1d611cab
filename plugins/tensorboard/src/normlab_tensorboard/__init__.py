"""TensorBoard event files for a run, through the host's ``on_log`` hook.

Writes with ``torch.utils.tensorboard.SummaryWriter`` into ``log_dir`` (default
``RUN_DIR/tensorboard``): every number of each epoch's ``metrics.csv`` row as a scalar at step
``epoch + 1`` (``train_loss``, ``loss/ce``, ``val_acc``, ...), each final metric as a scalar at the
last epoch's step (``clean/acc``, ``corruptions/acc``, ...), the run file as text, and, with
``plots: true``, each PNG of ``RUN_DIR/plots`` as an image. ``tensorboard --logdir RUN_DIR``
shows them.
"""

from __future__ import annotations

from pathlib import Path

from normlab import hookimpl

from .settings import Config

requires = ()
conflicts = ()
after = ()
knobs = ()

_OPEN: dict[str, object] = {}  # log_dir -> SummaryWriter, open while its run trains


def _writer(run):
    from torch.utils.tensorboard import SummaryWriter

    cfg: Config = run.plugin_config("tensorboard")
    log_dir = str(Path(cfg.log_dir).expanduser() if cfg.log_dir else Path(run.dir) / "tensorboard")
    if log_dir not in _OPEN:
        import yaml

        _OPEN[log_dir] = w = SummaryWriter(log_dir)
        w.add_text("run.yaml", "```\n" + yaml.safe_dump(run.resolved(), sort_keys=False) + "\n```")
    return _OPEN[log_dir]


@hookimpl
def on_log(ctx, metrics, plots):
    run = ctx.run
    w = _writer(run)
    step = ctx.epoch + 1 if ctx.epoch is not None else run.config.train.epochs
    for key, value in metrics.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            w.add_scalar(key, value, step)
    if ctx.epoch is None and run.plugin_config("tensorboard").plots:
        import numpy as np
        from PIL import Image

        for name, path in plots.items():
            w.add_image(f"plots/{name}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
    if ctx.epoch is None:  # the results: the run is done with this writer (a later `normlab eval` opens another)
        _OPEN.pop(next(k for k, v in _OPEN.items() if v is w)).close()
    else:
        w.flush()
