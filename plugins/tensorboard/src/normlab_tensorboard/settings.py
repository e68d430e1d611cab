"""Settings of the ``tensorboard`` plugin (no torch: checked before a run starts)."""

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    log_dir: str | None = Field(None, description="event files' folder (default: RUN_DIR/tensorboard)")
    plots: bool = Field(True, description="also write the run's PNG plots as images")
