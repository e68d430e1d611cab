"""Run files: YAML (safe_load only) validated with pydantic v2.

Every error is one line, ``FILE: key.path: what was expected``, raised as
:class:`~normlab.errors.UsageError` (exit status 2). Each plugin validates its
own section (``plugins: {name: {...}}``) with its ``Config`` model; each
evaluator its own (``evaluate: {name: {...}}``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from .errors import UsageError

__all__ = [
    "RunConfig", "ModelConfig", "RobustbenchModel", "DataConfig", "TrainConfig", "Strict",
    "load_run_file", "parse_run", "apply_overrides", "validate_section", "format_validation_error",
]


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RobustbenchModel(Strict):
    """A robustbench model-zoo entry as the backbone, loaded with ``robustbench.utils.load_model``.

    Its weights are read from ``{model_dir}/{dataset}/{threat_model}/{name}.pt``
    (robustbench's layout); normlab never lets robustbench download them.
    """

    name: str = Field(..., min_length=1, description="zoo name, e.g. 'Standard' or 'Hendrycks2020AugMix_WRN'")
    dataset: Literal["cifar10", "cifar100", "imagenet"] = "cifar10"
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf"
    model_dir: str = Field("./models", description="robustbench's model_dir (its default: ./models)")


class ModelConfig(Strict):
    name: str = Field("resnet18", description="any timm model name")
    pretrained: bool = Field(False, description="start from timm's pretrained weights (needs them cached offline)")
    checkpoint: str | None = Field(
        None, description="start from a checkpoint: a .safetensors/.pt state dict, or another run's directory")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    stem: Literal["default", "cifar"] = Field(
        "default", description="cifar: the small-input stem (3x3 stride-1 first conv, no max-pool) for 32 px "
                               "inputs, on timm ResNets, NF-ResNets and EfficientNets (newly initialised)")
    trainable: list[str] | None = Field(
        None, min_length=1, description="train only parameters whose backbone name starts with one of these "
                                        "prefixes (at least one)")
    robustbench: RobustbenchModel | None = Field(
        None, description="a robustbench zoo model as the backbone instead of a timm model (name, pretrained and "
                          "kwargs then stay at their defaults; the model normalises its [0, 1] inputs itself)")

    @field_validator("kwargs")
    @classmethod
    def _rates_are_probabilities(cls, v: dict[str, Any]) -> dict[str, Any]:
        """timm's dropout-like rates (``drop_rate``, ``drop_path_rate``, ...) are probabilities in [0, 1)."""
        for key, rate in v.items():
            if key.endswith("drop_rate") or key.endswith("drop_path_rate") or key == "drop_block_rate":
                if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
                    raise ValueError(f"{key} is a probability: expected a number in [0, 1), got {_short(rate)}")
        return v

    @field_validator("robustbench")
    @classmethod
    def _robustbench_replaces_timm(cls, v: RobustbenchModel | None, info: ValidationInfo) -> RobustbenchModel | None:
        """The rule: with ``robustbench`` set, the timm-only keys must keep their defaults."""
        if v is None:
            return v
        set_keys = [f"model.{k}={info.data[k]!r}" for k in ("name", "pretrained", "kwargs", "stem")
                    if k in info.data and info.data[k] != cls.model_fields[k].get_default(call_default_factory=True)]
        if set_keys:
            raise PydanticCustomError(
                "robustbench_with_timm",
                "a robustbench zoo model replaces the timm backbone: leave model.name, model.pretrained, "
                "model.kwargs and model.stem at their defaults (got {got})", {"got": ", ".join(set_keys)})
        return v


class DataConfig(Strict):
    name: Literal["mnist", "cifar10", "cifar100", "imagefolder"] = "mnist"
    root: str | None = Field(None, description="dataset folder (imagefolder: holds train/ and val/)")
    image_size: int = Field(32, ge=8, le=1024)
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(0, ge=0)
    n_train: int | None = Field(None, ge=1, description="use a fixed subset of this many training images")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise PydanticCustomError("std_positive", "every channel's std must be greater than 0 (got {got})",
                                      {"got": list(v)})
        return v


class TrainConfig(Strict):
    epochs: int = Field(3, ge=0, le=100_000)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="epochs at which `step` multiplies lr by gamma (each at least 1)")
    gamma: float = Field(0.1, gt=0, le=1)
    accumulate: int = Field(1, ge=1, description="gradient accumulation steps per optimizer step")
    sync_bn: bool = Field(False, description="with several processes (torchrun), normalise every BN with the "
                                             "global batch's statistics (SyncBatchNorm); otherwise each process "
                                             "uses its own batch_size / N rows'")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool | Literal["auto", "cuda"] = Field(
        "auto", description="the channels_last memory format of the model, its inputs and the attacks' folded "
                            "convolutions (the same numbers up to float rounding): auto (on CUDA, and on CPUs "
                            "without AMX, where oneDNN's channels-last convolutions are the faster ones; "
                            "benchmarks/README.md), cuda (on CUDA only), true (every device) or false")
    threads: int | None = Field(None, ge=1, le=4096, description="torch CPU threads (default: torch's choice)")
    val_examples: int | None = Field(None, ge=1, description="test images scored after each epoch for the val_acc "
                                                             "curve: the first of the split's fixed random order "
                                                             "(default: the whole split)")

    @field_validator("milestones")
    @classmethod
    def _step_only(cls, v: list[int], info: ValidationInfo) -> list[int]:
        schedule = info.data.get("schedule")
        if v and schedule is not None and schedule != "step":  # a run that would silently not step its lr
            raise ValueError(f"only schedule 'step' uses milestones (schedule is {schedule!r}); set "
                             f"train.schedule: step or remove train.milestones")
        return v


class RunConfig(Strict):
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy's seeds stop at 2**32 - 1")
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] | None = Field(
        None, min_length=1, max_length=100,
        description="one run per seed (OUT/seed-N) and a group summary (OUT/group.json): mean and 95% interval "
                    "over seeds; replaces seed")
    adapt_samples: int = Field(
        128, ge=1, le=100_000,
        description="unlabeled samples each test domain offers to on_domain (test-time adaptation): the first "
                    "adapt_samples of the domain's fixed random order, the same whatever n_examples and batch size")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="plugin name -> its settings, in call order (a list of names works too)")
    evaluate: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"clean": {}}, description="evaluator name -> its settings")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"each seed once, got {v}")
        return v

    @model_validator(mode="after")
    def _one_batch_at_least(self) -> "RunConfig":
        d = self.data
        if self.train.epochs and d.n_train is not None and d.n_train < d.batch_size:
            raise ValueError(f"data.n_train ({d.n_train}) is smaller than data.batch_size ({d.batch_size}): an "
                             "epoch would have no full batch; lower data.batch_size or raise data.n_train")
        return self

    @field_validator("plugins", "evaluate", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        return _as_mapping(value)


def _as_mapping(v: Any) -> Any:
    """Accept a list of names or a mapping of name -> settings (null = defaults)."""
    if v is None:
        return {}
    if isinstance(v, list) and all(isinstance(n, str) for n in v):
        out: dict[str, dict] = {}
        for n in v:
            if n in out:
                raise ValueError(f"{n!r} is named twice; each may appear once")
            out[n] = {}
        return out
    if isinstance(v, dict):
        return {k: ({} if s is None else s) for k, s in v.items()}
    return v


def _key_hint(key: Any, model: Any) -> str:
    from normlab_registry import did_you_mean

    if model is None or not hasattr(model, "model_fields"):
        return ""
    return did_you_mean(str(key), list(model.model_fields))


MAX_YAML_BYTES = 1 << 20  # a run file is settings, not data
MAX_YAML_DEPTH = 64  # mappings and lists nested deeper than this are refused
MAX_YAML_NODES = 100_000  # nodes after aliases are expanded (a "billion laughs" document is refused)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and documents nested or aliased past the bounds.

    Depth is checked while composing, before anything recurses into the document; the expanded size
    (each alias counted as a full copy of its anchor's node) is computed on the composed node graph,
    memoised per node, so an alias bomb is refused without being expanded.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels at line {mark.line + 1}")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.YAMLError(f"duplicate key {_short(key)} at line {key_node.start_mark.line + 1}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict) -> int:
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a cycle (a recursive alias) counts as too big
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(v, memo) for v in node.value)
    memo[id(node)] = size = min(size, MAX_YAML_NODES + 1)
    return size


def _cut(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, for error lines."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error lines."""
    return _cut(repr(value), limit)


def safe_yaml(text: str | bytes, where: str) -> Any:
    """Parse one YAML document with ``yaml.safe_load`` semantics, within bounds.

    Bytes must be UTF-8; more than :data:`MAX_YAML_BYTES`, nesting deeper than :data:`MAX_YAML_DEPTH`,
    more than :data:`MAX_YAML_NODES` nodes once aliases are expanded, and duplicate mapping keys are
    refused. Every problem is a :class:`UsageError` of one line starting with ``where``.
    """
    if len(text) > MAX_YAML_BYTES:
        raise UsageError(f"{where}: larger than {MAX_YAML_BYTES} bytes; a run file holds settings only")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text[:e.start].count(b"\n") + 1
            raise UsageError(f"{where}: not UTF-8 text (byte {e.object[e.start]:#04x} on line {line})") from None
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses control characters (a NUL byte) here
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise UsageError(f"{where}: more than {MAX_YAML_NODES} values once YAML aliases are expanded")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{where}: invalid YAML{at}: {problem}") from None
    except RecursionError:  # aliases can chain anchors, each within the depth bound, into a deeper graph
        raise UsageError(f"{where}: invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path) -> dict:
    """Read a run file's YAML mapping with :func:`safe_yaml`; any problem is a UsageError naming the file."""
    source = str(path)
    if not path.is_file():
        raise UsageError(f"{source}: " + ("expected a run file (YAML), got a directory" if path.is_dir()
                                          else "no such run file"))
    with open(path, "rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    data = safe_yaml(raw, source)
    if data is None:
        raise UsageError(f"{source}: the run file is empty; it needs at least one setting, "
                         "for example 'model: {name: resnet18}' (see the README's run-file reference)")
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw run-file mapping."""
    data = copy.deepcopy(data)
    for item in overrides:
        label = f"--set {_cut(item)}"
        if "=" not in item:
            raise UsageError(f"{label}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        value = safe_yaml(raw, label)
        parts = key.strip().split(".")
        if not all(parts):
            raise UsageError(f"{label}: empty key segment in {_short(key)}")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if part in ("plugins", "evaluate") and i == 0:
                child = _as_mapping(child if child is not None else {})
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise UsageError(f"{label}: {'.'.join(parts[:i + 1])} is not a mapping")
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def parse_run(data: Mapping, source: str) -> RunConfig:
    """Validate a raw run-file mapping into a :class:`RunConfig`."""
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as e:
        raise UsageError(format_validation_error(source, e)) from None


def format_validation_error(source: str, err: ValidationError, prefix: str = "", model: Any = None) -> str:
    """One line for the first pydantic error: ``FILE: key.path: message (got VALUE)``."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"]))
    if e["type"] == "extra_forbidden":
        owner = _owner(model or RunConfig, e["loc"][:-1])
        return f"{source}: {loc}: unknown key" + _key_hint(e["loc"][-1], owner)
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {_short(got)})"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{source}: {loc or '(top level)'}: {msg}{shown}"


def _owner(model: Any, loc: tuple) -> Any:
    """The pydantic model that holds the field at ``loc`` (looking inside ``X | None``)."""
    import typing

    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
        if not hasattr(model, "model_fields"):
            model = next((a for a in typing.get_args(model) if hasattr(a, "model_fields")), model)
    return model


def validate_section(model: type[BaseModel], data: Any, source: str, prefix: str) -> BaseModel:
    """Validate one plugin's or evaluator's settings; errors name ``prefix`` as the key path.

    A non-finite number (``.inf``, ``.nan``) anywhere in the validated settings is refused, whether or
    not the plugin's model says so: no method setting means anything at infinity.
    """
    try:
        out = model.model_validate(data or {})
    except ValidationError as e:
        raise UsageError(format_validation_error(source, e, prefix, model)) from None
    bad = _non_finite(out.model_dump() if isinstance(out, BaseModel) else out, prefix)
    if bad is not None:
        raise UsageError(f"{source}: {bad[0]}: expected a finite number (got {bad[1]})")
    return out


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The first (dotted path, value) of a non-finite float in nested dicts and lists, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}")
        if found is not None:
            return found
    return None


def load_run_file(path: str | Path, overrides: Sequence[str] = ()) -> tuple[RunConfig, dict]:
    """Read, override and validate a run file; return the config and the raw mapping."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    raw.pop("versions", None)  # written into run.yaml by normlab, not a setting
    return parse_run(raw, str(path)), raw
