"""The training loop: optimizer, schedule, per-step hooks, metrics, checkpoints, resume."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import time
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import last_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from .results import is_number, write_text_atomic
from .config import _short
from .context import Context
from .data import Batch
from .errors import RunFailure

__all__ = ["Scores", "LossTerms", "build_optimizer", "build_scheduler", "train", "autocast", "evaluate_accuracy",
           "domain_accuracy", "as_batch"]


class LossTerms:
    """Named per-sample losses with weights; the host minimises sum of mean(weight * loss).

    Weights are floats or per-sample tensors. A term's loss may be a scalar when
    it is not per sample (a KL over the batch).
    """

    def __init__(self, owner: Callable[[], str | None] = lambda: None):
        self.losses: dict[str, torch.Tensor] = {}
        self.weights: dict[str, Any] = {}
        self.owners: dict[str, str | None] = {}  # the plugin that last set each term (None: the host)
        self._owner = owner

    def add(self, name: str, loss: torch.Tensor, weight: Any = 1.0) -> None:
        if name in self.losses:
            raise KeyError(f"loss term {name!r} already exists")
        self.losses[name], self.weights[name], self.owners[name] = loss, weight, self._owner()

    def replace(self, name: str, loss: torch.Tensor, weight: Any = None) -> None:
        self.losses[name], self.owners[name] = loss, self._owner()
        if weight is not None:
            self.weights[name] = weight

    def reweight(self, name: str, weight: Any) -> None:
        self.weights[name], self.owners[name] = weight, self._owner()

    def described(self, name: str) -> str:
        """The term's name and the plugin that last set it, for messages."""
        owner = self.owners.get(name)
        return name if owner is None else f"{name} (plugin {owner!r})"

    def __contains__(self, name: str) -> bool:
        return name in self.losses

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.losses[name]

    def values(self) -> dict[str, torch.Tensor]:
        """Each term's weighted mean, as it enters the total."""
        return {n: (self.weights[n] * loss.float()).mean() for n, loss in self.losses.items()}

    def total(self) -> torch.Tensor:
        return torch.stack(list(self.values().values())).sum()


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, steps_per_epoch: int, cfg) -> float:
    """The learning-rate multiplier after ``step`` optimizer steps: linear warm-up, then the schedule."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return (step + 1) / warm
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1.0, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(opt, steps_per_epoch: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, cfg))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; nothing on CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Scores(NamedTuple):
    """Per-example results of an evaluation pass, in evaluation order (CPU tensors)."""

    correct: torch.Tensor  # bool: top-1 prediction is the label
    correct5: torch.Tensor | None  # bool: the label is among the top 5 (more than 10 classes only)
    labels: torch.Tensor

    @property
    def acc(self) -> float:
        return int(self.correct.sum()) / max(self.correct.numel(), 1)


@torch.no_grad()
def evaluate_accuracy(run, loader, desc: str = "eval", ctx: Context | None = None) -> Scores:
    """Per-example top-1 (and top-5 when there are more than 10 classes) of ``run.model`` in eval mode."""
    model = run.model
    was_training = model.training
    model.eval()
    ctx = ctx or Context(run=run)
    top1, top5, labels = [], [], []
    with ctx.active():
        for x, y in tqdm(loader, desc=desc, leave=False, disable=run.quiet):
            x, y = run.to_device(x), y.to(run.device)
            with autocast(run.device, run.config.train.amp):
                logits = model(x).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1.append(top[:, 0] == y)  # kept on the device: no sync per batch
            top5.append((top == y[:, None]).any(dim=1))
            labels.append(y)
    model.train(was_training)

    def cat(parts, dtype):
        return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=dtype)

    return Scores(cat(top1, torch.bool), cat(top5, torch.bool) if run.data.num_classes > 10 else None,
                  cat(labels, torch.long))


def domain_accuracy(run, loader, domain: str = "clean", ctx: Context | None = None) -> Scores:
    """:func:`evaluate_accuracy` of a test-split loader inside ``run.domain(domain, ...)``.

    The adaptation samples are the test split's (:meth:`~normlab.runner.Run.domain_samples`). The
    clean evaluator and the per-epoch validation both use it, so plugins' test-time settings (a
    lambda knob, a BN route) apply to validation as to evaluation.
    The model is in eval mode from before ``on_domain`` (as the hookspec promises: an adapting plugin's
    forwards during the per-epoch validation must not update train-mode BN statistics) until the
    domain's restores have run.
    """
    ctx = ctx or Context(run=run)
    samples, positions = run.domain_samples()
    was_training = run.model.training
    run.model.eval()
    try:
        with run.domain(domain, samples, ctx, positions):
            return evaluate_accuracy(run, loader, desc=domain, ctx=ctx)
    finally:
        run.model.train(was_training)


def as_batch(run, items) -> Batch:
    """A loader's items, ``(x, y)`` or ``(x, y, extra)`` (a dict of tensors), as a :class:`Batch` on the device.

    Datasets that plugins wrap (AugMix views made in the loader workers) return
    ``extra``; it reaches ``on_batch`` as ``batch.extra``.
    """
    x, y, *rest = items
    extra = {k: run.to_device(v) if isinstance(v, torch.Tensor) else v for k, v in (rest[0] if rest else {}).items()}
    return Batch(run.to_device(x), y.to(run.device, non_blocking=True), extra)


def _epoch_hooks(run, epoch: int, row: dict) -> None:
    """``on_epoch`` in eval mode without gradients; every value a plugin adds must be a finite number."""
    before = set(row)
    was_training = run.model.training
    run.model.eval()
    with torch.no_grad():
        run.hooks.call("on_epoch", model=run.model, ctx=Context(run=run, epoch=epoch), metrics=row)
    run.model.train(was_training)
    for key in set(row) - before:
        value = row[key]
        if not is_number(value):
            raise RunFailure(f"on_epoch: metrics[{key!r}] must be a finite number; got {_short(value)}")
        row[key] = float(value)


def _write_metrics(path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    write_text_atomic(path, buf.getvalue())


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops run inside the block, counted by torch's own per-op formulas (the registry behind
    ``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions, forward and backward).

    An adapter, not FlopCounterMode itself: its module tracker puts hooks on every module's backward,
    and ``torch.autograd.grad`` inside the block (a training attack's step in ``on_batch``/``on_loss``)
    then fails ("A leaf node was passed to _will_engine_execute_node ..."). Counting needs no modules.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def _flop_counter():
    """A :class:`FlopCount` around the first training step: on_batch, the forward, on_loss (a training
    attack's steps included) and the backward; not the optimizer's step."""
    return FlopCount()


LOG_EVERY = 20  # steps between progress-bar updates, the loop's only device-to-host reads within an epoch


class Finite:
    """The finiteness of every step's loss terms, kept on the device and read every ``LOG_EVERY`` steps
    (:meth:`check`), so the loop does not wait for the device at each step. A non-finite loss is still
    reported with the first step, pass and terms where it occurred; no checkpoint is written in between."""

    def __init__(self):
        self.pending: list[tuple[tuple, list[str], torch.Tensor]] = []

    def add(self, where: tuple, values: dict, names: list[str]) -> None:
        """``where``: (epoch, step in the epoch, global step, the pass's fields or None), all 0-based; ``names``:
        how a message names each of ``values``."""
        self.pending.append((where, names, torch.stack([torch.isfinite(v) for v in values.values()])))

    @staticmethod
    def _where(epoch: int, i: int, global_step: int, fields: dict | None) -> str:
        return (f"epoch {epoch + 1}, step {i + 1} (global step {global_step + 1}"
                + ("" if fields is None else f", pass {fields}") + ")")

    def check(self) -> None:
        if not self.pending:
            return
        flags = torch.cat([f for _, _, f in self.pending]).cpu()
        if bool(flags.all()):
            self.pending.clear()
            return
        offset = 0
        for where, names, f in self.pending:
            ok = flags[offset: offset + len(names)]
            offset += len(names)
            if not bool(ok.all()):
                self.pending.clear()
                raise RunFailure(f"non-finite loss at {self._where(*where)}; not finite: "
                                 f"{', '.join(n for n, g in zip(names, ok) if not g)}")


def _pass(run, batch, ctx: Context, epoch: int, i: int, global_step: int, finite: Finite) -> tuple[dict, torch.Tensor]:
    """One forward, the ``ce`` term and every plugin's ``on_loss`` under ``ctx``: (each term's value, the loss).

    Sets ``batch.logits``; records the terms' finiteness in ``finite``. A step with ``ctx.passes`` runs
    this (and a backward) once per pass, with the pass's fields set on ``ctx``.
    """
    cfg, hooks = run.config.train, run.hooks
    with ctx.active(), autocast(run.device, cfg.amp):
        batch.logits = run.model(batch.x)
        terms = LossTerms(owner=lambda: hooks.current)
        terms.add("ce", F.cross_entropy(batch.logits.float(), batch.y, reduction="none",
                                        label_smoothing=cfg.label_smoothing))
        hooks.call("on_loss", batch=batch, model=run.model, ctx=ctx, terms=terms)
        values = terms.values()
        loss = torch.stack(list(values.values())).sum()
    fields = None if ctx.passes is None else {k: getattr(ctx, k) for k in ctx.passes[0]}
    finite.add((epoch, i, global_step, fields), values, [terms.described(n) for n in values])
    return values, loss


def step_backward(run, batch, ctx: Context, epoch: int, i: int, global_step: int, finite: Finite,
                  accumulate: int = 1) -> tuple[Batch, torch.Tensor, dict]:
    """A training step up to the optimizer: ``on_batch``, then for each pass (``ctx.passes``, or one) the
    forward, the loss terms and the backward. Returns the batch, the first pass's logits and each term's
    value (and ``loss``) summed over the passes, on the device."""
    with ctx.active(), autocast(run.device, run.config.train.amp):
        batch = run.hooks.call("on_batch", batch=batch, ctx=ctx)
    first, sums = None, {}
    for overrides in ctx.passes or [None]:  # slimmable training: one pass per width
        values, loss = _pass(run, batch, ctx if overrides is None else dataclasses.replace(ctx, **overrides),
                             epoch, i, global_step, finite)
        (loss / accumulate).backward()
        if first is None:
            first = batch.logits.detach()
        for n, v in [*values.items(), ("loss", loss)]:
            sums[n] = sums[n] + v.detach() if n in sums else v.detach()
    return batch, first, sums


def train(run, resume: bool = False) -> list[dict]:
    """Train ``run.model`` for ``train.epochs``; checkpoint and log each epoch; return the history."""
    cfg, model, hooks = run.config.train, run.model, run.hooks
    main, world = distributed.is_main(), distributed.world()
    loader = run.data.loader("train", run.config.data.batch_size, seed=run.config.seed,
                             num_workers=run.config.data.num_workers, n=run.config.data.n_train, drop_last=True,
                             shard=(distributed.rank(), world))
    val_loader = run.data.loader("test", 512, shuffle=False, n=cfg.val_examples)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.accumulate))
    params = run.trainable_parameters()
    opt = build_optimizer(params, cfg)
    sched = build_scheduler(opt, steps_per_epoch, cfg)
    history: list[dict] = []
    start = 0
    if resume and last_checkpoint(run.dir) is not None:
        state = load_checkpoint(run.dir, model, opt, sched)
        start, history = state["epoch"], state.get("history", [])
        run.log.info("resuming after epoch %d", start)
        if main:  # a kill between the checkpoint and metrics.csv left the file an epoch behind
            _write_metrics(run.dir / "metrics.csv", history)
    elif resume:  # stopped before its first checkpoint: the same run from the start
        run.log.info("no finished epoch to resume from; starting over from epoch 0")
    if resume and main:
        for path in remove_partial(run.dir):
            run.log.info("removed an incomplete checkpoint: %s", path.name)
    global_step = start * len(loader)
    images, busy = 0, 0.0  # training images and seconds (validation and checkpoints left out): images per second
    for epoch in range(start, cfg.epochs):
        loader.sampler.set_epoch(epoch)
        run.train_mode()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        correct = seen = 0
        finite = Finite()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=run.quiet or not main)
        for i, items in enumerate(bar):
            batch = as_batch(run, items)
            ctx = Context(run=run, training=True, epoch=epoch, step=global_step)
            count = _flop_counter() if "train/step_flops" not in run.cost else contextlib.nullcontext()
            # the batches of this optimizer step: accumulate, or fewer in an epoch's last group, whose
            # gradient is then their mean too
            group = min(cfg.accumulate, len(loader) - i // cfg.accumulate * cfg.accumulate)
            with count:
                batch, first, values = step_backward(run, batch, ctx, epoch, i, global_step, finite, group)
            for n, v in values.items():
                sums[n] = sums.get(n, 0.0) + v
            if isinstance(count, FlopCount):
                run.cost["train/step_flops"] = float(count.total)
            if (i + 1) % cfg.accumulate == 0 or i + 1 == len(loader):
                distributed.all_reduce_gradients(params)  # several processes: the gradient of the global batch
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
            global_step += 1
            n_clean = batch.extra.get("n_clean", batch.y.numel())  # rows before any added views
            correct = correct + (first[:n_clean].argmax(1) == batch.y[:n_clean]).sum()  # the first pass's
            seen += n_clean
            if i % LOG_EVERY == 0:  # the only reads of device values inside the epoch
                finite.check()
                bar.set_postfix(loss=f"{float(sums['loss']) / (i + 1):.3f}")
        finite.check()
        if world > 1:  # the epoch's numbers over the global batches
            sums = distributed.mean_over_ranks(sums) if sums else sums
            correct, seen = distributed.sum_over_ranks(correct), seen * world
        sums = {n: float(v) for n, v in sums.items()}
        correct = int(correct)
        busy += time.perf_counter() - t0
        images += seen
        steps = len(loader)
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": sums.get("loss", 0) / steps,
               "train_acc": correct / max(seen, 1)}
        row.update({f"loss/{n}": v / steps for n, v in sums.items() if n != "loss"})
        row["val_acc"] = domain_accuracy(run, val_loader).acc
        row["seconds"] = time.perf_counter() - t0
        if hooks.implemented("on_epoch"):
            _epoch_hooks(run, epoch, row)
        if hooks.implemented("on_log") and main:
            hooks.call("on_log", ctx=Context(run=run, epoch=epoch), metrics=dict(row), plots={})
        history.append(row)
        run.log.info("epoch %d/%d: loss %.4f, train acc %.4f, val acc %.4f (%.1fs)", epoch + 1, cfg.epochs,
                     row["train_loss"], row["train_acc"], row["val_acc"], row["seconds"])
        if main:  # one writer; every rank holds the same weights
            save_checkpoint(run.dir, epoch + 1, model, opt, sched, extra={"history": history})
            _write_metrics(run.dir / "metrics.csv", history)
    if images:
        run.cost["train/images_per_s"] = images / busy
    if main and (cfg.epochs == 0 or start >= cfg.epochs and not (run.dir / "checkpoints" / "last.json").exists()):
        save_checkpoint(run.dir, 0, model, extra={"history": history})
    return history
