"""Settings of the pgd plugin: its run-file section ``plugins: {pgd: {...}}``.

Imports only pydantic, so that ``normlab run`` validates these settings before torch is imported (the
command line loads this file on its own, without the package; see docs/plugins.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _fraction(value: Any) -> Any:
    """Accept ``8/255`` (a string in YAML) for a budget or a step size."""
    if not isinstance(value, str):
        return value
    num, _, den = value.partition("/")
    try:
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction such as 8/255, got {value!r}") from None


Fraction = Annotated[float, BeforeValidator(_fraction)]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lam: float = Field(1.0, ge=0, le=1, description="weight of the adversarial loss when ctx.lam is not set")
    combine: Literal["lam", "mean"] = Field(
        "lam", description="lam: (1 - lam) CE + lam CE_adv per sample; mean: every view (clean, AugMix, "
                           "adversarial) weighs the same")
    eps: Fraction = Field(8 / 255, ge=0, description="perturbation budget in [0, 1] pixel units (8/255 allowed)")
    step_size: Fraction = Field(2 / 255, ge=0, description="attack step size (alpha)")
    steps: int = Field(10, ge=0, description="attack iterations (0: no attack)")
    random_start: bool = Field(True, description="start at a uniform random point of the eps-ball")
    norm: Literal["Linf", "L2"] = Field("Linf", description="threat model: torchattacks PGD or PGDL2")
    attack_rows: Literal["clean", "all"] = Field(
        "clean", description="clean: rows [:n_clean] of an AugMix batch; all: every row")
    fold: bool = Field(True, description="fold eval-mode BNs into their convolutions for the attack (exact up to "
                                         "float rounding; faster)")
    trades: bool = Field(False, description="TRADES: CE(x) + beta KL(p(x) || p(x_adv)), attack torchattacks TPGD")
    beta: float = Field(6.0, ge=0, description="TRADES weight of the KL term")

    @model_validator(mode="after")
    def _combinations(self):
        if self.trades and self.norm != "Linf":
            raise ValueError("trades: TRADES' attack (torchattacks TPGD) is Linf only; expected norm: Linf")
        if self.trades and (self.combine != "lam" or self.lam != 1.0):
            raise ValueError("trades: TRADES keeps CE(x) and adds beta KL; expected lam and combine left unset")
        if self.norm == "Linf" and self.eps > 1:
            raise ValueError("eps: a Linf budget above 1 is no budget: images are in [0, 1], so eps 1 already lets "
                             "every pixel take any value; expected [0, 1] pixel units, e.g. 8/255 rather than 8")
        if self.combine == "mean" and self.lam != 1.0:
            raise ValueError("lam: combine 'mean' weighs every view equally and ignores lam; expected lam unset")
        return self


# --- the attack ---------------------------------------------------------------
