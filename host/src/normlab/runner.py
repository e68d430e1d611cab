"""A run: resolve plugins, validate settings, build data and model, train, evaluate, write the run directory.

Everything that can reject the input happens before the run directory exists, so
bad input leaves nothing behind: the run file, plugins and settings in
:func:`prepare`, the data path, model name and weights in :meth:`Run.build`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from . import __version__, distributed
from .checkpoint import load_checkpoint
from .config import RunConfig, _cut, apply_overrides, load_run_file, parse_run, read_yaml, validate_section
from .context import Context
from .data import DataBundle, build_data, fingerprint, fixed_order, take
from .errors import RunFailure, UsageError
from .layers.taps import skip_padding_taps
from .evals import EVALUATORS, BuiltinEvaluators, Report
from .evals.settings import SETTINGS, validate, validate_evaluators
from .manager import HOOKS, Hooks, PluginInfo, discover, inspect_plugin, refuse_excluded
from .model import (NormlabNet, apply_norm_hooks, check_input, create_backbone, input_stats, load_state_file,
                    load_weights, set_trainable, top_level_layers, weights_mismatch)
from .plots import training_curves
from .results import read_results, unmakeable_dir, write_json_atomic, write_outcomes, write_text_atomic
from .train import train

__all__ = ["Run", "RunResult", "GroupResult", "prepare", "run", "evaluate", "load_model"]

log = logging.getLogger("normlab")


@dataclasses.dataclass
class RunResult:
    """What :func:`run` and :func:`evaluate` return."""

    dir: Path
    metrics: dict[str, float]
    model: nn.Module
    history: list[dict]


class Run:
    """A run being built or executed; passed to hooks as ``run``."""

    def __init__(self, config: RunConfig, source: str, plugins: dict[str, PluginInfo], enabled: list[str],
                 plugin_configs: dict[str, Any], evaluators: dict[str, Any], quiet: bool | None = None):
        self.config, self.source = config, source
        self.plugins, self.enabled = plugins, enabled
        self.plugin_configs, self.evaluators = plugin_configs, evaluators
        self.cost: dict[str, float] = {}  # results.json "cost": throughput, FLOPs, seconds per evaluator
        self.hooks = Hooks([("normlab.evaluators", BuiltinEvaluators())]
                           + [(n, plugins[n].plugin) for n in enabled])
        self.quiet = quiet
        self.log = log
        self.device = _device(config.train.device, source)
        self.channels_last = channels_last(config.train.channels_last, self.device)
        self.data: DataBundle | None = None
        self.model: NormlabNet | None = None
        self.dir: Path | None = None
        self.features: list[str] = []
        self._requested: dict[str, tuple[str | None, str | None]] = {}  # layer -> (plugin, its setting)
        self.trainable: list[str] | None = None
        self.state: dict[str, Any] = {}  # plugins' per-run scratch, by plugin name
        self.loaded_epoch: int | None = None  # a run directory loaded to evaluate: the epoch of its checkpoint
        # where model.checkpoint was loaded: "before" the plugins' on_model/on_batch_norm (into the plain
        # backbone), "after" them (into the reshaped model), or None (no checkpoint)
        self.checkpoint_stage: str | None = None

    # --- API for plugins -------------------------------------------------
    def plugin_config(self, name: str) -> Any:
        """The validated settings of plugin ``name`` (its ``Config`` instance, or a dict)."""
        return self.plugin_configs[name]

    def request_feature(self, layer: str, key: str | None = None) -> None:
        """Ask for ``on_feature`` calls with the output of backbone layer ``layer``.

        ``key`` names the plugin setting the layer came from (``layer`` for ``plugins.NAME.layer``), so
        that a layer the backbone lacks is reported against it. Every plugin that implements
        ``on_feature`` receives every requested layer: check ``name``.
        """
        if layer not in self.features:
            self.features.append(layer)
        self._requested.setdefault(layer, (self.hooks.current, key))

    def train_only(self, prefixes: Sequence[str]) -> None:
        """Suggest which backbone parameters train (a run file's ``model.trainable`` wins)."""
        self.trainable = list(prefixes)

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, number of processes) of a distributed run (``(0, 1)`` otherwise): each training batch a plugin
        sees is rows ``rank * n : (rank + 1) * n`` of a global batch of ``n * processes`` rows, so a plugin that
        draws per-row randomness (condition's lambdas) draws it for the global batch and keeps its rows."""
        return distributed.rank(), distributed.world()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the run's device, in its own layout: a channels-last model relayouts its input itself
        (:class:`~normlab.model.NormlabNet`), so what plugins and attacks draw for a batch (noise, random
        starts: in memory order) is the same whatever ``train.channels_last`` is."""
        return x.to(self.device, non_blocking=True)

    @property
    def adapts(self) -> bool:
        """Whether a plugin adapts to test domains (implements ``on_domain``): evaluators that would
        load or generate images only to adapt on them skip that work otherwise."""
        return bool(self.hooks.implemented("on_domain"))

    def domain_samples(self, images: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A test domain's adaptation samples and their positions in ``images`` (default: the test split).

        ``images`` is the whole domain in dataset order (a Dataset yielding ``(x, ...)``, a tensor or
        an array); the samples are the images at the first ``adapt_samples`` positions of its fixed
        random order (:func:`normlab.data.fixed_order`): a seeded uniform draw over every class,
        the same whatever ``n_examples`` and batch size. Evaluators whose domain is stored in that
        order already (the corruption cache) take its first rows instead.
        """
        images = self.data.test if images is None else images
        positions = fixed_order(len(images))[: self.config.adapt_samples]
        return take(images, positions), positions

    @contextlib.contextmanager
    def domain(self, name: str, samples: torch.Tensor, ctx: Context | None = None,
               positions: torch.Tensor | Sequence[int] | None = None) -> Iterator[None]:
        """Adapt the model to test domain ``name`` (``on_domain``) for the block, then undo it.

        ``samples`` are the domain's unlabeled adaptation images (see :meth:`domain_samples`);
        ``positions``, their indices in the domain, are recorded in results.json
        (``records.adaptation``) when a plugin adapts.
        """
        ctx = ctx or Context(run=self)
        restores = []
        if self.adapts:
            if positions is not None:
                seen = self.state.setdefault("adaptation", {})
                seen[name] = [int(i) for i in positions]
            with ctx.active():  # plugin forwards during adaptation read the evaluation context
                restores = self.hooks.call("on_domain", model=self.model, domain=name,
                                           samples=self.to_device(samples), ctx=ctx)
        try:
            yield
        finally:
            for undo in reversed(restores):
                undo()

    def trainable_parameters(self) -> list[nn.Parameter]:
        prefixes = self.config.model.trainable if self.config.model.trainable is not None else self.trainable
        return set_trainable(self.model, prefixes, self.source)

    def train_mode(self) -> None:
        """``model.train()``, except that BN layers outside the trainable prefixes keep their statistics."""
        self.model.train()
        prefixes = self.config.model.trainable if self.config.model.trainable is not None else self.trainable
        if prefixes is None:
            return
        for name, m in self.model.backbone.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes):
                m.eval()

    # --- building --------------------------------------------------------
    def build(self, load_init: bool = True) -> None:
        cfg = self.config
        seed_everything(cfg.seed)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.data = build_data(cfg.data, self.source)
        used = min(len(self.data.train), cfg.data.n_train or len(self.data.train))
        if cfg.train.epochs and used < cfg.data.batch_size:  # the setting alone is checked in config
            under = f" under {cfg.data.root}" if cfg.data.root else ""
            raise UsageError(f"{self.source}: data.batch_size: {cfg.data.batch_size} is more than the {used} "
                             f"training images{under}: an epoch would have no full batch; lower data.batch_size")
        backbone = create_backbone(cfg.model, self.data.num_classes, self.source)
        model = NormlabNet(backbone, *input_stats(cfg, self.data, self.source))
        check_input(model, len(self.data.mean), self.data.image_size, cfg.model, self.source)
        init = load_state_file(cfg.model.checkpoint, self.source) if load_init and cfg.model.checkpoint else None
        if init is not None and weights_mismatch(model, init) is None:
            # weights of the plain backbone load before the plugins change it, so what plugins copy
            # (AdvBN's auxiliary BNs, OAT's clean/adversarial pairs) starts from the trained layers
            load_weights(model, init, self.source, "model.checkpoint")
            self.checkpoint_stage, init = "before", None
        self.model = model
        model.backbone = self.hooks.call("on_model", model=model.backbone, run=self)
        apply_norm_hooks(model.backbone, self.hooks, self)
        if init is not None:  # weights of a model the plugins reshape (another NF or OAT run) fit only now
            load_weights(model, init, self.source, "model.checkpoint")
            self.checkpoint_stage = "after"
        skip_padding_taps(model)  # exact: small maps' convolutions skip the taps that meet only padding
        self._install_feature_hooks()
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
            model.memory_format = torch.channels_last
        self.trainable_parameters()  # validates model.trainable before anything is written
        for name, settings in self.evaluators.items():  # settings that name parts of the model
            if EVALUATORS[name].check_model is not None:
                EVALUATORS[name].check_model(self, settings)

    def _install_feature_hooks(self) -> None:
        names = dict(self.model.backbone.named_modules())
        for layer in self.features:
            if layer not in names:
                plugin, key = self._requested.get(layer, (None, None))
                where = f"plugins.{plugin}" + (f".{key}" if key else "") if plugin else "a plugin"
                raise UsageError(f"{self.source}: {where}: asked for backbone layer {layer!r}, which "
                                 f"{self.config.model.name} lacks (its top-level layers: "
                                 f"{top_level_layers(self.model.backbone)})")
            names[layer].register_forward_hook(_FeatureHook(layer, self.hooks))

    def versions(self) -> dict:
        """Provenance written into run.yaml: package versions (the evaluators' libraries included), every
        enabled plugin's version, the project's git commit when normlab runs from a checkout, a
        content hash of the training and test splits (:func:`normlab.data.fingerprint`), and the device and
        memory format the run computed in (``train.device`` and ``train.channels_last`` as resolved here)."""
        import importlib.metadata as md

        def version(dist: str) -> str | None:
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                return None

        out = {"normlab": __version__, "torch": str(torch.__version__)}
        out.update({d: version(d) for d in ("timm", "torchattacks", "pyautoattack", "robustbench",
                                            "imagecorruptions")})
        out["plugins"] = {n: self.plugins[n].version for n in self.enabled}
        out["git"] = _git_commit()
        if self.data is not None:
            out["data"] = {"train": fingerprint(self.data.train), "test": fingerprint(self.data.test)}
        out["device"] = str(self.device)
        out["memory_format"] = "channels_last" if self.channels_last else "contiguous"
        return out

    def resolved(self) -> dict:
        """The run file with every default filled in, as written to run.yaml."""
        out = self.config.model_dump(mode="json")
        out["plugins"] = {n: _dump(self.plugin_configs[n]) for n in self.enabled}
        out["evaluate"] = {n: _dump(c) for n, c in self.evaluators.items()}
        return out


class _FeatureHook:
    """Forward hook that passes a requested layer's output through ``on_feature``."""

    def __init__(self, layer: str, hooks: Hooks):
        self.layer, self.hooks = layer, hooks

    def __call__(self, module, inputs, output):
        from .context import current

        ctx = current()
        out = self.hooks.call("on_feature", name=self.layer, feature=output, ctx=ctx)
        ctx.features[self.layer] = out
        return out if out is not output else None


def _dump(cfg: Any) -> Any:
    return cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg


def _device(name: str, source: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{source}: train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def channels_last(setting: bool | str, device: torch.device) -> bool:
    """Whether a run's model, inputs and attack convolutions are channels-last (``train.channels_last``).

    ``auto``: on CUDA; on a CPU unless it has AMX tiles. Measured with resnet18 at 32x32, batch 128, one
    thread (benchmarks/README.md): on an AVX2 EPYC channels-last took 0.80x the contiguous training step
    and 0.68x an attack step (eval forward + input gradient); on an AMX Xeon 1.01x that attack step and
    1.09x AdvBN's folded one. Decided by the processor, never by timing, so one machine always takes one
    layout and a seed gives the same numbers run after run.
    """
    if setting == "auto":
        return device.type == "cuda" or not cpu_has_amx()
    return setting is True or (setting == "cuda" and device.type == "cuda")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch's own check; False where this torch lacks it)."""
    check = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(config: RunConfig, source: str, extra_plugins: Mapping[str, Any] | None = None,
            quiet: bool | None = None) -> Run:
    """Resolve and validate everything a run needs; raise UsageError on bad input. Builds nothing."""
    from normlab_registry import PluginSpec, ResolutionError, resolve

    installed = discover()
    for name, obj in (extra_plugins or {}).items():
        installed[name] = inspect_plugin(name, obj, distribution="(passed to normlab.run)")
    specs = {n: PluginSpec(n, requires=i.requires, conflicts=i.conflicts, distribution=i.distribution,
                           after=i.after, error=i.error, extra={"conflict_reasons": i.conflict_reasons})
             for n, i in installed.items()}
    refuse_excluded([n for n in config.plugins if n not in installed], source)
    try:
        enabled = resolve(list(config.plugins), specs)
    except ResolutionError as e:
        raise UsageError(f"{source}: plugins: {e}") from None
    plugin_configs = {}
    for name in enabled:
        model = getattr(installed[name].plugin, "Config", None)
        settings = config.plugins[name]
        if model is None:
            if settings:
                raise UsageError(f"{source}: plugins.{name}: this plugin takes no settings, got {sorted(settings)}")
            plugin_configs[name] = {}
        else:
            plugin_configs[name] = validate_section(model, settings, source, f"plugins.{name}")
    evaluators = validate_evaluators(config.evaluate, source)
    run = Run(config, source, installed, enabled, plugin_configs, evaluators, quiet)
    for name, settings in evaluators.items():
        if EVALUATORS[name].check is not None:
            EVALUATORS[name].check(run, settings)
    return run


def _load_config(config: str | Path | Mapping | RunConfig, overrides: Sequence[str]) -> tuple[RunConfig, str]:
    if isinstance(config, RunConfig):
        data, source = config.model_dump(mode="json"), "config"
        return parse_run(apply_overrides(data, overrides), source), source
    if isinstance(config, Mapping):
        return parse_run(apply_overrides(dict(config), overrides), "config"), "config"
    cfg, _ = load_run_file(config, overrides)
    return cfg, str(config)


LOCK = ".lock"  # in the run directory: holds the pid of the process using it, under an exclusive flock


def _try_lock(run_dir: Path) -> int | str:
    """Take the run directory's exclusive lock; return its fd, or the holder's pid (a str) if it is held."""
    import fcntl

    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a damaged run directory: a folder or an unreadable file where the lock goes
        raise UsageError(f"{run_dir / LOCK}: cannot open the run directory's lock file ({e.strerror}); it holds only "
                         f"the pid of the normlab process using the run: remove it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return holder
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _busy(what: str, run_dir: Path, pid: str) -> UsageError:
    return UsageError(f"{what} {run_dir}: another normlab process (pid {pid}) is using this run directory; "
                      f"wait for it to finish")


@contextlib.contextmanager
def _locked(run_dir: Path, what: str) -> Iterator[None]:
    """Hold the run directory's lock for the block; a second process exits 2 naming the holder's pid."""
    got = _try_lock(run_dir)
    if isinstance(got, str):
        raise _busy(what, run_dir, got)
    try:
        yield
    finally:
        os.close(got)  # releases the flock


def _holder(run_dir: Path) -> str | None:
    """The pid holding ``run_dir``'s lock, or None (checked without keeping the lock)."""
    if not (run_dir / LOCK).is_file():
        return None
    got = _try_lock(run_dir)
    if isinstance(got, str):
        return got
    os.close(got)
    return None


def _new_run_dir(out: str | Path | None, source: str, resume: bool, marker: str = "run.yaml") -> Path:
    if out is None:
        if resume:
            raise UsageError("--resume: needs --out DIR naming the run to continue")
        stem = Path(source).stem if source != "config" else "run"
        out = Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(out)
    why = unmakeable_dir(out)
    if why is not None:
        raise UsageError(f"--out {out}: {why}")
    holder = _holder(out) if out.is_dir() else None
    if holder is not None:
        raise _busy("--out", out, holder)
    if resume:
        if not (out / marker).is_file():
            raise UsageError(f"--out {out}: no run to resume there ({marker} is missing)")
    elif out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise UsageError(f"--out {out}: the directory exists and is not empty; pass --resume to continue "
                         f"that run or choose another directory")
    return out


def _check_resume(run: Run, out: Path) -> None:
    saved = _canonical(run, read_yaml(out / "run.yaml"), f"{out}/run.yaml")
    now = run.resolved()
    for section in ("train",):
        saved.get(section, {}).pop("epochs", None)
        now.get(section, {}).pop("epochs", None)
    if json.dumps(saved, sort_keys=True) != json.dumps(now, sort_keys=True):
        diff = _differences(saved, now)
        key, was, is_ = diff[0]
        more = f" (and {len(diff) - 1} more: {', '.join(k for k, _, _ in diff[1:4])})" if len(diff) > 1 else ""
        raise UsageError(f"{out}/run.yaml: {key}: the run being resumed has {json.dumps(was)}, this run file "
                         f"{json.dumps(is_)}{more}; resume with the same settings (--set {key}=...) or start a "
                         f"new run")


_MISSING = "(absent)"


def _differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key path, value in ``a``, value in ``b``) of every leaf where two resolved run files differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [(path or "(top level)", a, b)]


def changed_group_setting(group_yaml: Path, now: dict) -> tuple[str, Any, Any] | None:
    """The first setting (dotted key, saved value, value in ``now``) where a seed group's saved group.yaml,
    filled with this version's defaults, differs from ``now`` (a resolved RunConfig); None where none does."""
    saved = parse_run(read_yaml(group_yaml), str(group_yaml)).model_dump(mode="json")
    changed = _differences(saved, now)
    return changed[0] if changed else None


def _canonical(run: Run, raw: dict, source: str) -> dict:
    """A saved run.yaml with every default of this version filled in, as :meth:`Run.resolved` writes it.

    A run directory written by an earlier version lacks keys added since (``adapt_samples``, a
    plugin's new setting); filled with their defaults, it compares equal to the same run now.
    """
    raw = {k: v for k, v in raw.items() if k != "versions"}
    out = parse_run(raw, source).model_dump(mode="json")
    plugins = out.get("plugins") or {}
    for name, settings in plugins.items():
        model = getattr(run.plugins[name].plugin, "Config", None) if name in run.plugins else None
        if model is not None:
            plugins[name] = _dump(validate_section(model, settings, source, f"plugins.{name}"))
    for name, settings in (out.get("evaluate") or {}).items():
        if name in SETTINGS:
            out["evaluate"][name] = _dump(validate(name, settings, source, f"evaluate.{name}"))
    return out


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return handler


def run(config: str | Path | Mapping | RunConfig, *, out: str | Path | None = None, overrides: Sequence[str] = (),
        resume: bool = False, plugins: Mapping[str, Any] | None = None, quiet: bool | None = None) -> RunResult:
    """Train and evaluate from a run file (path), a mapping or a :class:`RunConfig`.

    ``plugins`` registers plugin objects directly (name -> module or object),
    beside those installed through entry points; the run file still names them.
    Raises :class:`UsageError` for bad input (nothing is written) and
    :class:`RunFailure` for failures while running.
    """
    cfg, source = _load_config(config, overrides)
    if distributed.launched():
        check_processes(cfg, source, int(os.environ["WORLD_SIZE"]))
    if cfg.seeds is not None:
        return _run_seeds(config, cfg, source, out, overrides, resume, plugins, quiet)
    r = prepare(cfg, source, plugins, quiet)
    if distributed.launched():
        return _run_distributed(r, out, source, resume)
    run_dir = _new_run_dir(out, source, resume)
    r.build()
    if resume:
        _check_resume(r, run_dir)
    return _start(r, run_dir, resume)


def _start(r: Run, run_dir: Path, resume: bool) -> RunResult:
    """Write the run directory (run.yaml first, under its lock, with log.txt) and train and evaluate into it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    r.dir = run_dir
    with _locked(run_dir, "--out"):
        if not resume:  # first, so that a run killed at any later point can be resumed
            write_text_atomic(run_dir / "run.yaml",
                              yaml.safe_dump({**r.resolved(), "versions": r.versions()}, sort_keys=False))
        with _logged(run_dir):
            if distributed.world() > 1:
                log.info("distributed: %d processes (%s), global batch %d, %d per rank", distributed.world(),
                         "nccl" if r.device.type == "cuda" else "gloo", r.config.data.batch_size,
                         r.config.data.batch_size // distributed.world())
            return _train_and_evaluate(r, resume)


def check_processes(cfg: RunConfig, source: str, processes: int) -> None:
    """What one run on ``processes`` processes refuses: several seeds, a global batch that does not split."""
    if cfg.seeds is not None:
        raise UsageError(f"{source}: seeds: a distributed launch runs one seed; launch one per seed, or use "
                         f"`normlab launch FILE --seeds ...` (each seed a job)")
    if cfg.data.batch_size % processes:
        raise UsageError(f"{source}: data.batch_size: expected a multiple of the {processes} processes (each takes "
                         f"batch_size / {processes} rows of every global batch), got {cfg.data.batch_size}")


def _on_main(check):
    """``check()`` on rank 0 alone, its result on every rank; a UsageError it raises stops every rank alike."""
    out = None
    if distributed.rank() == 0:
        try:
            out = check()
        except UsageError as e:
            out = e
    out = distributed.from_main(out)
    if isinstance(out, UsageError):
        raise out
    return out


def _run_distributed(r: Run, out, source: str, resume: bool) -> RunResult:
    """One rank of a torchrun launch (normlab.distributed): every rank builds and trains; rank 0 checks and
    writes the run directory and, after training, evaluates alone."""
    r.device = distributed.init(r.device)
    rank = distributed.rank()
    if rank:
        r.quiet = True
        log.setLevel(logging.WARNING)
    run_dir = Path(_on_main(lambda: str(_new_run_dir(out, source, resume))))
    r.build()
    if r.config.train.sync_bn:
        log.info("train.sync_bn: %d BN layers synchronised over %d processes",
                 distributed.sync_batch_norms(r.model), distributed.world())
    if resume:
        _on_main(lambda: _check_resume(r, run_dir))
    if rank == 0:
        return _start(r, run_dir, resume)
    r.dir = run_dir
    train(r, resume=resume)  # reads checkpoints from the run directory, writes nothing
    distributed.close()
    return RunResult(run_dir, {}, r.model, [])


@dataclasses.dataclass
class GroupResult:
    """What :func:`run` returns for a run file with ``seeds``: the group directory, its summary
    (``group.json``: per metric the mean, 95% interval over seeds and the values) and each seed's run
    directory."""

    dir: Path
    summary: dict
    runs: dict[int, Path]

    @property
    def metrics(self) -> dict[str, float]:
        """The mean over seeds of every metric all runs report."""
        return {k: m["mean"] for k, m in self.summary["metrics"].items()}


def _run_seeds(config, cfg: RunConfig, source: str, out, overrides: Sequence[str], resume: bool, plugins,
               quiet) -> GroupResult:
    """One run per seed into OUT/seed-N, then OUT/group.json. Resuming skips finished seeds and resumes the
    others (a seed killed before its first checkpoint starts over)."""
    from .group import GROUP_YAML, seed_dir, summarize

    prepare(cfg.model_copy(update={"seeds": None}), source, plugins, quiet)  # everything checkable, before any run
    group_dir = _new_run_dir(out, source, resume, marker=GROUP_YAML)
    group_dir.mkdir(parents=True, exist_ok=True)
    with _locked(group_dir, "--out"):
        if resume:
            saved = read_yaml(group_dir / GROUP_YAML)
            if saved.get("seeds") != cfg.seeds:
                raise UsageError(f"{group_dir / GROUP_YAML}: the group was started with seeds {saved.get('seeds')}, "
                                 f"not {cfg.seeds}")
            changed = changed_group_setting(group_dir / GROUP_YAML, cfg.model_dump(mode="json"))
            if changed is not None:  # finished seeds are kept
                key, was, is_ = changed
                raise UsageError(f"{group_dir / GROUP_YAML}: {key}: the group being resumed has {json.dumps(was)}, "
                                 f"this run file {json.dumps(is_)}; its finished seeds would be averaged with runs "
                                 f"of other settings: resume with the same settings or start a new group")
        else:
            write_text_atomic(group_dir / GROUP_YAML, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        runs = {}
        for seed in cfg.seeds:
            sub = seed_dir(group_dir, seed)
            runs[seed] = sub
            if resume and (sub / "results.json").is_file():
                continue
            log.info("seed group %s: seed %d (%d of %d)", group_dir, seed, cfg.seeds.index(seed) + 1, len(cfg.seeds))
            run(config, out=sub, overrides=[*overrides, f"seed={seed}", "seeds=null"],
                resume=resume and (sub / "run.yaml").is_file(), plugins=plugins, quiet=quiet)
        return GroupResult(group_dir, summarize(group_dir, cfg.seeds), runs)


def _train_and_evaluate(r: Run, resume: bool) -> RunResult:
    run_dir = r.dir
    log.info("plugin call order: %s", " -> ".join(r.enabled) or "(none)")
    for hook in HOOKS:
        if r.hooks.implemented(hook):
            log.info("  %s: %s", hook, " -> ".join(r.hooks.implemented(hook)))
    history = train(r, resume=resume)
    distributed.close()  # evaluation runs in this process alone (rank 0 of a distributed run)
    # every epoch's seconds (history travels with the checkpoints): a resumed run counts its earlier processes too
    timing = {"train": sum(row.get("seconds", 0.0) for row in history)}
    training_curves(history, run_dir / "plots" / "training.png")
    report = _evaluate(r, timing)
    _write_results(r, report, timing)
    _log_results(r, report)
    return RunResult(run_dir, report.metrics, r.model, history)


def _log_results(r: Run, report: Report) -> None:
    """``on_log`` with the evaluation's metrics and every plot in the run directory."""
    if r.hooks.implemented("on_log"):
        plots = {p.stem: str(p) for p in sorted((r.dir / "plots").glob("*.png"))}
        r.hooks.call("on_log", ctx=Context(run=r, epoch=None), metrics=dict(report.metrics), plots=plots)


@contextlib.contextmanager
def _logged(run_dir: Path) -> Iterator[None]:
    """log.txt for the block; it ends with the failure message when the block fails."""
    handler = _setup_logging(run_dir)

    def last_words(msg: str, exc_info=None) -> None:  # to log.txt only: the CLI prints its own line
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, exc_info))

    try:
        yield
    except UsageError as e:
        last_words(f"error: {e}")
        raise
    except RunFailure as e:
        last_words(f"run failed: {e}")
        raise
    except KeyboardInterrupt:
        last_words("interrupted; continue with --resume")
        raise
    except Exception as e:
        last_words(f"failed: {type(e).__name__}: {e}", sys.exc_info())
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _evaluate(r: Run, timing: dict, name: str | None = None) -> Report:
    t0 = time.perf_counter()
    r.model.eval()
    before = set(r.cost)
    report = Report()
    r.hooks.call("on_eval", model=r.model, ctx=Context(run=r), report=report)
    adapted = r.state.pop("adaptation", None)
    if adapted:
        report.records["adaptation"] = {
            "rule": "each domain's first adapt_samples images in its fixed random order (torch.randperm seeded 0)",
            "adapt_samples": r.config.adapt_samples, "positions": adapted}
    timing[f"{name}/eval" if name else "eval"] = time.perf_counter() - t0
    if name:
        for k in set(r.cost) - before:
            r.cost[f"{name}/{k}"] = r.cost.pop(k)
        named = Report()
        named.include(report, f"{name}/")
        named.records = {f"{name}/{k}": v for k, v in report.records.items()}
        named.plots = report.plots
        report = named
    return report


def _write_results(r: Run, report: Report, timing: dict) -> None:
    """Merge into results.json (and correct.safetensors): what earlier evaluations stored stays unless
    recomputed."""
    path = r.dir / "results.json"
    previous = read_results(r.dir, required=False)
    write_outcomes(r.dir, report.outcomes)
    write_json_atomic(path, {
        "metrics": {**previous.get("metrics", {}), **report.metrics},
        "timing": {**previous.get("timing", {}), **timing},
        "plugins": {**previous.get("plugins", {}), **{n: r.plugins[n].version for n in r.enabled}},
        "records": {**previous.get("records", {}), **report.records},
        "cost": {**previous.get("cost", {}), **r.cost, **_peak_memory(r.device, previous.get("cost", {}))},
        "seed": r.config.seed,
        "normlab": __version__,
    })


def _git_commit() -> str | None:
    """The commit of the git checkout normlab is imported from (``+dirty`` with uncommitted changes), else None."""
    import subprocess

    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _peak_memory(device: torch.device, before: Mapping[str, float]) -> dict[str, float]:
    """The run's peak memory: CUDA memory allocated by torch on a GPU, else the peak resident set, of this
    process or of an earlier one of the same run (``before``: results.json's cost; resumed, evaluated again)."""
    if device.type == "cuda":
        now, cuda = torch.cuda.max_memory_allocated(device) / 2**20, 1.0
    else:
        import resource

        now, cuda = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0.0
    if before.get("peak_memory_cuda") == cuda:
        now = max(now, before.get("peak_memory_mb", 0.0))
    return {"peak_memory_mb": now, "peak_memory_cuda": cuda}


def _from_run_dir(run_dir: str | Path, overrides: Sequence[str], plugins, quiet) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / "run.yaml").is_file():
        raise UsageError(f"{run_dir}: not a normlab run directory (run.yaml is missing)")
    cfg, _ = load_run_file(run_dir / "run.yaml", overrides)
    cfg.model.pretrained = False  # the run's own checkpoint replaces any initial weights
    r = prepare(cfg, str(run_dir / "run.yaml"), plugins, quiet)
    r.build(load_init=False)
    built_from = "run.yaml" + "".join(f" and --set {_cut(o)}" for o in overrides)
    r.loaded_epoch = int(load_checkpoint(run_dir, r.model, built_from=built_from).get("epoch", 0))
    r.dir = run_dir
    return r


def evaluate(run_dir: str | Path, *, overrides: Sequence[str] = (), plugins: Mapping[str, Any] | None = None,
             quiet: bool | None = None, name: str | None = None) -> RunResult:
    """Evaluate a finished run again (other evaluators, plugins or knobs via ``overrides``) without training.

    With ``name``, the new metrics are stored as ``NAME/<key>`` beside the
    earlier ones (for instance ``bnrect/corruptions/acc`` next to
    ``corruptions/acc``); otherwise they replace keys of the same name.
    """
    if name is not None and (not name or "/" in name):
        raise UsageError(f"--as {name!r}: expected a non-empty name without '/'")
    if distributed.launched():
        raise UsageError(f"{run_dir}: normlab eval runs in one process (a distributed run evaluates on rank 0 "
                         f"alone); run it without torchrun")
    r = _from_run_dir(run_dir, overrides, plugins, quiet)
    done, epochs = r.loaded_epoch, r.config.train.epochs
    if done < epochs:  # its last checkpoint is not the trained model: results.json would make it look finished
        raise UsageError(f"{r.dir}: training has not finished (the last checkpoint is epoch {done} of {epochs}); "
                         f"finish it first: normlab run RUN_FILE --out {r.dir} --resume")
    read_results(r.dir, required=False)  # a corrupt results.json is refused before the evaluation, not after
    with _locked(r.dir, "eval"), _logged(r.dir):
        timing: dict = {}
        report = _evaluate(r, timing, name)
        _write_results(r, report, timing)
        _log_results(r, report)
    _refresh_group(r.dir)
    return RunResult(r.dir, report.metrics, r.model, [])


def _refresh_group(run_dir: Path) -> None:
    """A seed run re-evaluated inside a seed group: the group's summary again from its runs (it went stale),
    once every seed has results."""
    from .group import GROUP_FILE, GROUP_YAML, seed_dir, summarize

    group_dir = run_dir.parent
    if not (run_dir.name.startswith("seed-") and (group_dir / GROUP_FILE).is_file()
            and (group_dir / GROUP_YAML).is_file()):
        return
    seeds = read_yaml(group_dir / GROUP_YAML).get("seeds")
    if not (isinstance(seeds, list) and seeds and
            all((seed_dir(group_dir, s) / "results.json").is_file() for s in seeds)):
        return
    got = _try_lock(group_dir)
    if isinstance(got, str):  # the group is running: it writes group.json itself when its seeds finish
        log.warning("seed group %s is in use (pid %s): its group.json was not summarised again", group_dir, got)
        return
    try:
        summarize(group_dir, seeds)
    finally:
        os.close(got)
    log.info("seed group %s: group.json summarised again from its %d runs", group_dir, len(seeds))


def load_model(run_dir: str | Path) -> nn.Module:
    """The trained model of a run directory, in eval mode (for notebooks)."""
    r = _from_run_dir(run_dir, (), None, True)
    return r.model.eval()
