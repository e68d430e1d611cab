"""An example third-party normlab plugin: Gaussian noise on training inputs.

It uses only normlab's public API: ``normlab.hookimpl`` and the objects the
hooks receive. Enable it in a run file with::

    plugins:
      noise: {sigma: 0.1}
"""

import torch
from pydantic import BaseModel, ConfigDict, Field

from normlab import hookimpl


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sigma: float = Field(0.1, ge=0, description="noise standard deviation, in [0, 1] pixel units")
    p: float = Field(1.0, ge=0, le=1, description="fraction of samples that get noise")


@hookimpl
def on_batch(batch, ctx):
    cfg = ctx.run.plugin_config("noise")
    if cfg.sigma == 0 or cfg.p == 0:
        return None
    noisy = (batch.x + cfg.sigma * torch.randn_like(batch.x)).clamp(0, 1)
    keep = torch.rand(batch.x.shape[0], 1, 1, 1, device=batch.x.device) >= cfg.p
    batch.x = torch.where(keep, batch.x, noisy)
    return batch
