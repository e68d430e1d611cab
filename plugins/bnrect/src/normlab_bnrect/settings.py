"""Settings of the bnrect plugin: its run-file section ``plugins: {bnrect: {...}}``.

Imports only pydantic, so that ``normlab run`` validates these settings before torch is imported (the
command line loads this file on its own, without the package; see docs/plugins.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(32, ge=1, description="unlabeled samples per domain (one batch)")
    adapt: Literal["both", "mean", "var"] = Field("both", description="which statistics to re-estimate")
    part: Literal["all", "front", "middle", "end"] = Field("all", description="which third of the BN layers")
    layers: list[str] | None = Field(None, description="only BN layers whose name starts with one of these")
    prior: float | None = Field(None, ge=0, allow_inf_nan=False,
                                description="N: mix source statistics with weight N / (N + n)")
    estimate: Literal["layerwise", "batch"] = Field(
        "layerwise", description="layerwise: each BN normalises with its final values during the adaptation "
                                 "forward; batch: one train-mode forward, as Benz et al.'s code")
    per_batch: bool = Field(False, description="re-estimate on every evaluated batch (Schneider et al.'s "
                                               "evaluation) instead of once per domain from n_samples")
    domains: list[str] = Field(
        default_factory=lambda: ["corruptions/", "style/"],
        description="domain-name prefixes to adapt to (the clean source domain is not adapted by default)")
