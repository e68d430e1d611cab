"""Settings of the advbn plugin: its run-file section ``plugins: {advbn: {...}}``.

Imports only pydantic, so that ``normlab run`` validates these settings before torch is imported (the
command line loads this file on its own, without the package; see docs/plugins.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: str = Field("layer1", description="split point: the adversarial features are this layer's output")
    steps: int = Field(6, ge=1, description="sign-gradient ascent steps on the multipliers")
    step_size: float = Field(0.2, gt=0, description="tau: the size of each step")
    eps: float = Field(1.1, ge=0, description="multipliers are clipped to [1 - eps, 1 + eps]")
    clamp: Literal["auto", True, False] = Field(
        "auto", description="clamp f_adv at 0 (auto: when the clean feature has no negative entry, i.e. after a ReLU)")
    samples: Literal["all", "clean"] = Field(
        "all", description="rows to perturb: all, or the first batch.extra['n_clean'] (AugMix's clean rows)")
    train: Literal["tail", "all"] = Field("tail", description="which part trains (a run file's model.trainable wins)")
    weight: float = Field(1.0, ge=0, description="weight of the adversarial CE term")
    fold: bool = Field(True, description="fold the tail's eval-mode BNs into their convolutions for the attack "
                                         "(exact up to float rounding; faster)")
    route: Literal["main", "aux", "auto"] = Field("main", description="test-time BN route of the tail")
