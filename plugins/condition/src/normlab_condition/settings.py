"""Settings of the condition plugin: its run-file section ``plugins: {condition: {...}}``.

Imports only pydantic, so that ``normlab run`` validates these settings before torch is imported (the
command line loads this file on its own, without the package; see docs/plugins.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    choices: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 1.0], min_length=1,
                                 description="the lambda values sampled in training (distinct, in [0, 1])")
    zero_fraction: float | None = Field(None, ge=0, le=1, description=(
        "fraction of each batch with lambda = 0 (null: 1/len(choices), rounded up to whole rows, "
        "as the public code)"))
    sampling: Literal["fixed", "iid"] = Field("fixed", description=(
        "fixed: exactly ceil(zero_fraction * N) zeros first; iid: each row 0 with probability zero_fraction, "
        "then the zeros moved to the front"))
    encoding: Literal["orthogonal", "onehot", "scalar"] = Field("orthogonal", description=(
        "orthogonal: rows of a random dim x dim orthogonal matrix; onehot: rows of the "
        "len(choices) identity; scalar: lambda itself"))
    dim: int = Field(128, ge=1, description="size of the orthogonal encoding")
    hidden: int | None = Field(None, ge=1, description="hidden width of the FiLM MLPs (null: dim for normlab's "
                                                        "FiLM, 2C for the OAT code's)")
    film_style: Literal["oat", "normlab"] = Field(
        "normlab", description="oat: the OAT code's FiLM (one leaky-ReLU MLP d -> 2C -> 2C, x * mu + sigma, after "
                               "the stem and block BNs only); normlab: x * (1 + s) + t from two zero-initialised "
                               "ReLU MLPs (identity at the start), after every BN including the shortcuts'; the "
                               "default, as it trained far better in the measured 4-epoch runs (docs/results.md)")
    dual_bn: bool = Field(True, description="clean / adversarial BN pair (false: one BN, for the ablation)")
    film: bool = Field(True, description="FiLM after each BN (false: dual BN only, for the ablation)")
    lam: float = Field(1.0, ge=0, le=1, description="the test-time knob: lambda for evaluation")

    @model_validator(mode="after")
    def _check(self):
        if any(not 0 <= c <= 1 for c in self.choices):
            raise ValueError(f"choices must lie in [0, 1], got {self.choices}")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices must be distinct, got {self.choices}")
        if self.zero_fraction and 0 not in self.choices:
            raise ValueError("zero_fraction > 0 needs 0 among the choices")
        if self.zero_fraction is not None and self.zero_fraction < 1 and not any(self.choices):
            raise ValueError("choices has no nonzero value to sample the rows that are not 0")
        if self.encoding == "orthogonal" and self.dim < len(self.choices):
            raise ValueError(f"an orthogonal encoding of {len(self.choices)} choices needs dim >= "
                             f"{len(self.choices)}, got {self.dim}")
        return self

    @property
    def zeros(self) -> float:
        """The resolved fraction of lambda = 0 rows."""
        if self.zero_fraction is not None:
            return self.zero_fraction
        return 1 / len(self.choices) if 0 in self.choices else 0.0

    @property
    def code_dim(self) -> int:
        return {"orthogonal": self.dim, "onehot": len(self.choices), "scalar": 1}[self.encoding]
