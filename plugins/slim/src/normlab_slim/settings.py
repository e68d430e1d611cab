"""Settings of the slim plugin: its run-file section ``plugins: {slim: {...}}``.

Imports only pydantic, so that ``normlab run`` validates these settings before torch is imported (the
command line loads this file on its own, without the package; see docs/plugins.md).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    widths: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0], min_length=1,
                                description="the width factors trained, each in (0, 1] (OATS: 0.5, 0.75, 1.0); "
                                            "each step runs one pass per width, largest first")
    width: float | None = Field(None, description="the test-time knob: the width evaluated, one of widths "
                                                  "(null: the largest)")

    @model_validator(mode="after")
    def _check(self):
        if any(not 0 < w <= 1 for w in self.widths):
            raise ValueError(f"widths must lie in (0, 1], got {self.widths}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct, got {self.widths}")
        self.widths = sorted(self.widths, reverse=True)
        if self.width is not None and self.width not in self.widths:
            raise ValueError(f"width must be one of widths {self.widths}, got {self.width}")
        return self

    @property
    def default_width(self) -> float:
        return self.width if self.width is not None else self.widths[0]
