"""Settings of the nf plugin: its run-file section ``plugins: {nf: {...}}``.

Imports only pydantic, so that ``normlab run`` validates these settings before torch is imported (the
command line loads this file on its own, without the package; see docs/plugins.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "build", "convert"] = Field(
        "auto", description="build: timm's NF counterpart; convert: in-place conversion of a timm ResNet; "
                            "auto: build where a counterpart exists, else convert")
    alpha: float = Field(0.2, gt=0, description="residual branch scale (convert mode; NF-ResNets use 0.2)")
    target: str | None = Field(None, description="timm NF model to build instead of the mapped counterpart")
    calibrate: int = Field(0, ge=0, description="training images that set the stem and shortcut gains for unit "
                                                   "variance after pooling (convert mode; 0: off, the default: "
                                                   "it is in no reference and hurt in every measured setting)")
    agc: float | None = Field(None, gt=0, description="adaptive gradient clipping factor (null: off)")
    agc_eps: float = Field(1e-3, gt=0, description="AGC's floor on the parameter norm")


# --- gamma-scaled activations ---------------------------------------------------
