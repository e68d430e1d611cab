"""Settings of the ``mlflow`` plugin (no torch: checked before a run starts)."""

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(None, description="any MLflow tracking URI (default: a local file store, "
                                                       "file:RUN_DIR/mlruns)")
    experiment: str = Field("normlab", min_length=1, description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name (default: the run directory's name)")
    plots: bool = Field(True, description="also log the run's PNG plots as artifacts")
