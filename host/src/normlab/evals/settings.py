"""Every evaluator's settings, importable without torch.

``SETTINGS`` maps an evaluator's name (a key under ``evaluate:``) to its
settings model; :func:`validate_evaluators` checks a run file's ``evaluate:``
section against them (a sweep's nested evaluators included). The CLI runs it
before torch is imported, so a misspelled evaluator setting is refused as fast
as a misspelled plugin setting; :func:`normlab.runner.prepare` runs the same
function. What depends on the run (a sweep's knob declared by an enabled
plugin, ...) is checked later by each evaluator's ``check``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator, model_validator

from ..config import Strict, validate_section
from ..errors import UsageError

__all__ = ["SETTINGS", "validate_evaluators", "validate", "EvalSettings", "AttackSettings", "BudgetSettings", "Budget",
           "COMMON", "VALIDATION", "GENERATED", "KNOBS"]

#: imagecorruptions' ``get_corruption_names('common')``, in its order (ImageNet-C's 15)
COMMON = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
          "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
          "jpeg_compression")
#: imagecorruptions' ``get_corruption_names('validation')`` (generate only)
VALIDATION = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
#: the style evaluator's generated domains
GENERATED = ("invert", "color", "texture")
#: the evaluation context's fields a sweep may vary
KNOBS = ("lam", "width", "route")

Norm = Literal["Linf", "L2"]


def _is_dir(path: str) -> bool:
    import os

    return os.path.isdir(os.path.expanduser(path))


def _existing_data_dir(cls, v: str | None) -> str | None:
    """A typo in a data folder is refused before training, not met after it (or, for robustbench's
    data_dir, silently replaced by the run's own test split)."""
    if v is not None and not _is_dir(v):
        raise ValueError("expected an existing directory")
    return v


_data_dir_exists = field_validator("data_dir")(classmethod(_existing_data_dir))


class EvalSettings(Strict):
    """Settings every evaluator accepts, and where in the run file they are (:attr:`key`)."""

    n_examples: int | None = Field(None, ge=1, description="evaluate on a fixed subset of this many test images")
    batch_size: int = Field(256, ge=1)
    _key: str | None = PrivateAttr(None)  # set by validate(): evaluate.NAME or evaluate.sweep.evaluators.NAME

    @property
    def key(self) -> str:
        """The key path of these settings in the run file, for messages: ``evaluate.pgd`` at the top level,
        ``evaluate.sweep.evaluators.pgd`` inside a sweep (settings made in code: their evaluator's top-level key)."""
        if self._key is not None:
            return self._key
        return "evaluate." + next((n for n, c in SETTINGS.items() if c is type(self)), type(self).__name__)


class CleanConfig(EvalSettings):
    pass


# --- attacks ------------------------------------------------------------------

def _number(value: Any) -> Any:
    """Accept ``8/255`` (a string in YAML) wherever a budget or step size is expected."""
    if not isinstance(value, str):
        return value
    try:
        num, _, den = value.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError("expected a number or a fraction such as 8/255") from None


Budget = Annotated[float, BeforeValidator(_number)]


class AttackSettings(EvalSettings):
    """Settings every attack evaluator accepts."""

    seed: int | None = Field(None, ge=0, description="attack randomness seed (default: the run's seed)")
    adapt: Literal["static", "adaptive", "both"] = Field(
        "static", description="static: attack the model adapted once to the domain's samples; adaptive: every "
                              "attack forward adapts to the attacked batch itself (keys <name>/adaptive/...); "
                              "both: the two, one after the other (docs/adaptive.md)")


LINF_ABOVE_ONE = ("a Linf budget above 1 is no budget: images are in [0, 1], so eps 1 already lets every pixel "
                  "take any value; expected [0, 1] pixel units, e.g. 8/255 rather than 8")


class BudgetSettings(AttackSettings):
    eps: Budget | None = Field(None, ge=0, description="perturbation budget in [0, 1] pixel units, e.g. 8/255 "
                                                      "(default: the dataset's usual threat model)")

    @model_validator(mode="after")
    def _linf_budget(self):
        if getattr(self, "norm", "Linf") == "Linf" and self.eps is not None and self.eps > 1:
            raise ValueError(f"eps: {LINF_ABOVE_ONE}")
        return self


class FGSMConfig(BudgetSettings):
    """FGSM (Goodfellow et al.): one signed-gradient step of size eps (Linf)."""


class PGDConfig(BudgetSettings):
    """PGD (Madry et al.) with a random start in the eps-ball."""

    norm: Norm = "Linf"
    steps: int = Field(20, ge=1)
    alpha: Budget | None = Field(None, gt=0, description="step size (default: 2.5 * eps / steps, Madry et al.)")
    random_start: bool = True
    eot: int | None = Field(None, ge=1, description="Linf: gradients averaged over this many forwards per step "
                                                    "(torchattacks EOTPGD; expectation over transformation, for "
                                                    "stochastic models; default 1)")

    @model_validator(mode="after")
    def _check_eot(self):
        if (self.eot or 1) > 1 and self.norm != "Linf":
            raise ValueError("eot > 1 needs norm 'Linf' (torchattacks' EOTPGD); apgd takes eot with L2")
        return self


class MIFGSMConfig(BudgetSettings):
    """MI-FGSM (Dong et al.): iterative FGSM with gradient momentum (Linf)."""

    steps: int = Field(10, ge=1)
    alpha: Budget | None = Field(None, gt=0, description="step size (default: eps / steps, as in the paper)")
    decay: float = Field(1.0, ge=0, description="momentum decay factor mu")


class CWConfig(AttackSettings):
    """Carlini-Wagner L2 (torchattacks; a fixed constant c, no binary search)."""

    c: float = Field(1.0, gt=0, description="weight of the misclassification term")
    kappa: float = Field(0.0, ge=0, description="confidence margin")
    steps: int = Field(100, ge=1)
    lr: float = Field(0.01, gt=0, description="Adam learning rate in tanh space")
    eps: Budget | None = Field(None, gt=0, description="count an adversarial example only if its L2 norm is at "
                                                      "most eps (default: any size counts)")


class APGDConfig(BudgetSettings):
    """APGD (Croce & Hein) as in torchattacks, with the original's 100 iterations by default."""

    norm: Norm = "Linf"
    steps: int = Field(100, ge=1, description="iterations per restart (torchattacks' default is 10)")
    n_restarts: int = Field(1, ge=1)
    rho: float = Field(0.75, gt=0, lt=1, description="step-size halving threshold")
    eot: int | None = Field(None, ge=1, description="gradients averaged over this many forwards per iteration "
                                                    "(torchattacks APGD's eot_iter; expectation over "
                                                    "transformation, for stochastic models; default 1)")


class SquareConfig(BudgetSettings):
    """Square Attack (Andriushchenko et al.): score-based, no gradients."""

    norm: Norm = "Linf"
    n_queries: int = Field(5000, ge=1)
    n_restarts: int = Field(1, ge=1)
    p_init: float = Field(0.8, gt=0, le=1, description="initial fraction of pixels changed per square")


class AutoAttackConfig(BudgetSettings):
    """AutoAttack (Croce & Hein, 2020)."""

    norm: Literal["Linf", "L2", "L1"] = "Linf"
    version: Literal["standard", "fast", "plus", "rand"] = Field(
        "standard", description="standard: APGD-CE, APGD-T, FAB-T, Square (100 iterations per APGD); "
                                "fast: APGD-CE and APGD-T with the standard settings; plus; rand (EOT, for "
                                "randomised defenses)")
    implementation: Literal["pyautoattack", "torchattacks"] = Field(
        "pyautoattack", description="pyautoattack: the original AutoAttack; torchattacks: its re-implementation, "
                                    "which runs 10 iterations per APGD (weaker; only when asked for)")
    eot: int | None = Field(None, ge=1, description="APGD-CE's and APGD-T's eot_iter (expectation over "
                                                    "transformation; default: 1, or 20 for version rand, as the "
                                                    "original sets)")

    @model_validator(mode="after")
    def _check_implementation(self):
        if self.norm == "L1" and self.eps is None:
            raise ValueError("norm 'L1' has no default budget: set eps")
        if self.implementation == "torchattacks":
            if self.version == "fast":
                raise ValueError("version 'fast' exists only for implementation 'pyautoattack'")
            if self.norm == "L1":
                raise ValueError("norm 'L1' exists only for implementation 'pyautoattack'")
            if self.eot is not None:
                raise ValueError("eot exists only for implementation 'pyautoattack'")
        return self


class RobustbenchEvalConfig(EvalSettings):
    """RobustBench's evaluation (clean and threat-model accuracy), through benchmark() where it works."""

    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf"
    eps: float | None = Field(None, gt=0, description="budget in [0, 1] pixel units for Linf/L2 (default: "
                                                      "RobustBench's: 8/255 / 0.5 on CIFAR, 4/255 on ImageNet)")
    dataset: Literal["cifar10", "cifar100", "imagenet"] | None = Field(
        None, description="robustbench's benchmark dataset: the run's own (default: the run's data if CIFAR; an "
                          "image folder: the zoo backbone's dataset, else none; none: normlab's own test split)")
    data_dir: str | None = Field(None, description="robustbench's data_dir (default: the run's data.root, "
                                                   "else normlab's data folder, NORMLAB_DATA)")
    _data_dir = _data_dir_exists
    version: Literal["standard", "fast"] = Field(
        "standard", description="AutoAttack version; benchmark() runs only standard, so fast always takes the "
                                "equivalent path")
    seed: int | None = Field(None, ge=0, description="AutoAttack's seed on the equivalent path (default: the run's)")

    @model_validator(mode="after")
    def _check(self):
        if self.threat_model == "corruptions" and self.eps is not None:
            raise ValueError("eps applies to Linf and L2 only")
        if self.threat_model == "Linf" and self.eps is not None and self.eps > 1:
            raise ValueError(f"eps: {LINF_ABOVE_ONE}")
        return self


# --- domain shifts ------------------------------------------------------------

class CorruptionsConfig(EvalSettings):
    corruptions: list[str] = Field(default_factory=lambda: list(COMMON),
                                   description="imagecorruptions names (default: the 15 of ImageNet-C)")
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], description="severities, each 1..5")
    source: Literal["generate", "robustbench"] = Field(
        "generate", description="generate: imagecorruptions on the test split, cached; robustbench: the released "
                                "CIFAR-10-C / CIFAR-100-C / ImageNet-C through robustbench's loaders")
    cache_dir: str | None = Field(None, description="generated sets (default $NORMLAB_DATA/corruptions)")
    data_dir: str | None = Field(None, description="source robustbench: the folder holding CIFAR-10-C/, "
                                                   "CIFAR-100-C/ or ImageNet-C/ (default $NORMLAB_DATA)")
    _data_dir = _data_dir_exists
    workers: int | None = Field(None, ge=1, description="processes generating the cache (default: CPU count)")
    plot: bool = Field(True, description="write plots/corruptions.png into the run directory")
    regenerate: bool = Field(False, description="source generate: delete and rebuild the cached files this "
                                                "evaluation uses (after their sha256 no longer matches)")

    @field_validator("corruptions")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from normlab_registry import did_you_mean

        known = COMMON + VALIDATION
        for name in v:
            if name not in known:
                raise ValueError(f"unknown corruption {name!r}{did_you_mean(name, known)}; "
                                 f"known: {', '.join(known)}")
        if not v or len(set(v)) != len(v):
            raise ValueError("give at least one corruption, each once")
        return v

    @field_validator("severities")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(s not in (1, 2, 3, 4, 5) for s in v):
            raise ValueError(f"expected distinct severities from 1 to 5, got {v}")
        return v


def _generated(v: list[str] | None) -> list[str] | None:
    unknown = [d for d in v or () if d not in GENERATED]
    if unknown:
        raise ValueError(f"unknown domain {unknown[0]!r}; generated domains are {', '.join(GENERATED)} "
                         f"(ImageFolders go under evaluate.style.folders)")
    return v


class StyleConfig(EvalSettings):
    domains: list[str] | None = Field(
        None, description=f"generated domains among {GENERATED} (default: all three for mnist, none otherwise)")
    folders: dict[str, str] = Field(default_factory=dict, description="domain name -> ImageFolder directory")
    seed: int = Field(0, ge=0, description="seed of the generated domains")

    _domains = field_validator("domains")(classmethod(lambda cls, v: _generated(v)))

    @field_validator("folders")
    @classmethod
    def _folders_exist(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not _is_dir(path):
                raise ValueError(f"{name}: directory {path!r} does not exist")
        return v


class DivergenceConfig(EvalSettings):
    n_examples: int | None = Field(500, ge=2)
    domains: list[str] = Field(default_factory=lambda: list(GENERATED),
                               description=f"generated style domains among {GENERATED}")
    layers: list[str] | None = Field(None, description="backbone layers (default: the stages, else every norm layer)")
    seed: int = Field(0, ge=0)

    _domains = field_validator("domains")(classmethod(lambda cls, v: _generated(v)))


# --- sweep --------------------------------------------------------------------

class SweepConfig(Strict):
    knob: str | None = Field(None, description=f"the context field to vary (one of {KNOBS}), plugins.NAME.FIELD "
                                               "or plugins.NAME")
    values: list[Any] | None = Field(None, min_length=1)
    grid: dict[str, list[Any]] | None = Field(
        None, description=f"instead of knob and values: several context knobs (of {KNOBS}) at once, every "
                          "combination, e.g. {lam: [0, 0.4, 1], width: [0.5, 1.0]}; keys sweep/lam=V,width=W/...")
    evaluators: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"clean": {}})
    _parsed: dict | None = PrivateAttr(None)  # the nested evaluators' validated settings
    _variants: list | None = PrivateAttr(None)  # plugin knobs: (label, validated plugin settings) per value

    @property
    def plugin(self) -> str | None:
        """The plugin whose settings are swept, or None for a context knob."""
        return self.knob.split(".")[1] if self.knob is not None and self.knob.startswith("plugins.") else None

    @property
    def axes(self) -> dict[str, list[Any]]:
        """Each knob swept and its values: the grid, or the one knob."""
        return dict(self.grid) if self.grid is not None else {self.knob: self.values}

    @model_validator(mode="after")
    def _check(self):
        if "sweep" in self.evaluators:
            raise ValueError("a sweep cannot contain a sweep")
        if self.grid is not None:
            if self.knob is not None or self.values is not None:
                raise ValueError("give either grid or knob and values, not both")
            if not self.grid or not all(self.grid.values()):
                raise ValueError("grid needs at least one knob, each with at least one value")
            bad = [k for k in self.grid if k not in KNOBS]
            if bad:
                raise ValueError(f"grid knobs must be among {KNOBS}, got {bad[0]!r}")
        elif self.knob is None or self.values is None:
            raise ValueError("expected knob and values (or a grid)")
        elif self.plugin is not None:
            parts = self.knob.split(".")
            if len(parts) not in (2, 3) or not all(parts):
                raise ValueError(f"a plugin knob is plugins.NAME or plugins.NAME.FIELD, got {self.knob!r}")
            if len(parts) == 2 and not all(isinstance(v, dict) and v for v in self.values):
                raise ValueError("with knob plugins.NAME each value is a mapping of that plugin's settings")
        elif self.knob not in KNOBS:
            raise ValueError(f"knob must be one of {KNOBS} or plugins.NAME[.FIELD], got {self.knob!r}")
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in self.axes.get("lam", [])):
            raise ValueError("lam values must be numbers in [0, 1]")
        return self


SETTINGS: dict[str, type[Strict]] = {
    "clean": CleanConfig,
    "fgsm": FGSMConfig,
    "pgd": PGDConfig,
    "mifgsm": MIFGSMConfig,
    "cw": CWConfig,
    "apgd": APGDConfig,
    "apgd_dlr": APGDConfig,
    "square": SquareConfig,
    "autoattack": AutoAttackConfig,
    "robustbench": RobustbenchEvalConfig,
    "corruptions": CorruptionsConfig,
    "style": StyleConfig,
    "divergence": DivergenceConfig,
    "sweep": SweepConfig,
}


def validate_evaluators(evaluate: dict[str, Any], source: str) -> dict[str, Strict]:
    """Each ``evaluate:`` entry validated against its evaluator's settings; a sweep's nested ones too.

    Raises UsageError naming ``source`` and the key (``evaluate.pgd.eps``, an unknown evaluator with
    the nearest known name, ``evaluate.sweep.evaluators.fgsm``).
    """
    from normlab_registry import did_you_mean

    out = {}
    for name, settings in evaluate.items():
        if name not in SETTINGS:
            raise UsageError(f"{source}: evaluate.{name}: unknown evaluator" + did_you_mean(name, list(SETTINGS))
                             + f"; available: {', '.join(SETTINGS)}")
        out[name] = validate(name, settings, source, f"evaluate.{name}")
    if "sweep" in out:
        nested_evaluators(out["sweep"], source)
    return out


def nested_evaluators(sweep: SweepConfig, source: str) -> None:
    """A sweep's nested evaluators validated into ``sweep._parsed``."""
    from normlab_registry import did_you_mean

    parsed = {}
    for name, settings in sweep.evaluators.items():
        if name not in SETTINGS:
            raise UsageError(f"{source}: evaluate.sweep.evaluators.{name}: unknown evaluator"
                             + did_you_mean(name, list(SETTINGS)))
        parsed[name] = validate(name, settings, source, f"evaluate.sweep.evaluators.{name}")
    sweep._parsed = parsed


def validate(name: str, settings: Any, source: str, key: str) -> Strict:
    """Evaluator ``name``'s settings validated; errors, and the settings' own :attr:`EvalSettings.key`, name ``key``."""
    out = validate_section(SETTINGS[name], settings, source, key)
    if isinstance(out, EvalSettings):
        out._key = key
    return out
