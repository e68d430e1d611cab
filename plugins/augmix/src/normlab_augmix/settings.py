"""Settings of the augmix plugin: its run-file section ``plugins: {augmix: {...}}``.

Imports only pydantic, so that ``normlab run`` validates these settings before torch is imported (the
command line loads this file on its own, without the package; see docs/plugins.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    views: int = Field(2, ge=1, description="augmented views per image (the paper uses 2 for the JSD loss)")
    severity: int = Field(3, ge=1, le=10, description="operation strength, 1..10")
    width: int = Field(3, ge=1, description="augmentation chains mixed per view")
    depth: int = Field(-1, ge=-1, description="operations per chain; -1 draws 1..3 per chain")
    alpha: float = Field(1.0, gt=0, description="Dirichlet and Beta parameter of the mixing weights")
    all_ops: bool = Field(False, description="add colour/contrast/brightness/sharpness (they overlap -C)")
    loss: Literal["jsd", "ce"] = Field("jsd", description="jsd: CE(clean) + jsd_alpha * JS; ce: CE on every row")
    jsd_alpha: float = Field(12.0, ge=0, description="weight of the Jensen-Shannon consistency term")
    split_bn: bool = Field(False, description="separate BN layers for the augmented rows")
    workers: int = Field(2, ge=0, description="DataLoader worker processes that make the views (0: training thread)")
