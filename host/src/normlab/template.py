"""``normlab new-plugin NAME``: a plugin package that installs, runs and passes its own tests."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UsageError

__all__ = ["new_plugin"]

PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "normlab-{dash}"
version = "0.1.0"
description = "A normlab plugin: {name}"
requires-python = ">=3.10"
dependencies = ["normlab"]

[project.entry-points.normlab]
{name} = "normlab_{name}"

[tool.setuptools.packages.find]
where = ["src"]
'''

MODULE = '''"""normlab plugin {name!r}: logit squeezing, a loss term ``weight * mean(logits ** 2)`` per sample.

Replace the hooks with your method's; docs/plugins.md in normlab lists every hook and public name.
Enable it with ``plugins: {{{name}: {{weight: 0.05}}}}``.
"""

from __future__ import annotations

from normlab import UsageError, hookimpl

from .settings import Config

NAME = "{name}"


@hookimpl
def on_model(model, run):
    cfg: Config = run.plugin_config(NAME)
    if cfg.layer is not None and cfg.layer not in dict(model.named_modules()):
        raise UsageError(f"{{run.source}}: plugins.{{NAME}}.layer: {{run.config.model.name}} has no layer "
                         f"{{cfg.layer!r}}")


@hookimpl
def on_loss(batch, model, ctx, terms):
    cfg: Config = ctx.run.plugin_config(NAME)
    terms.add(NAME, batch.logits.float().pow(2).mean(dim=1), cfg.weight)
'''

SETTINGS = '''"""Settings of {name!r}: pydantic only, so `normlab run` checks them before torch is imported."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float = Field(0.05, ge=0, description="weight of the squared-logit term")
    layer: str | None = Field(None, description="optional: a backbone layer that must exist (an example check)")
'''

TEST = '''"""Tests of the {name!r} plugin: a tiny run on normlab's embedded data (about 10 s on a laptop CPU)."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # without installing the package

import normlab  # noqa: E402
import normlab_{name} as plugin  # noqa: E402

TINY = {{"data": {{"image_size": 16, "n_train": 64, "batch_size": 32}}, "train": {{"epochs": 1}},
        "evaluate": {{"clean": {{"n_examples": 32}}}}}}


def test_the_term_is_logged_with_its_weight(tmp_path):
    res = normlab.run({{**TINY, "plugins": {{"{name}": {{"weight": 0.5}}}}}}, out=tmp_path / "run",
                      plugins={{"{name}": plugin}}, quiet=True)
    rows = list(csv.DictReader((res.dir / "metrics.csv").open()))
    assert float(rows[0]["loss/{name}"]) > 0  # weight * mean(logits ** 2), averaged over the epoch


def test_a_bad_layer_is_one_usage_error_before_anything_is_written(tmp_path):
    with pytest.raises(normlab.UsageError, match=r"plugins.{name}.layer: resnet18 has no layer 'layer9'"):
        normlab.run({{**TINY, "plugins": {{"{name}": {{"layer": "layer9"}}}}}}, out=tmp_path / "bad",
                    plugins={{"{name}": plugin}}, quiet=True)
    assert not (tmp_path / "bad").exists()
'''

README = '''# normlab-{dash}

A normlab plugin. Install it next to normlab and name it in a run file:

    pip install -e .
    normlab plugins {name}          # its hooks and settings
    pytest tests                     # its tests

```yaml
plugins:
  {name}: {{weight: 0.05}}
```
'''


def new_plugin(name: str, where: Path) -> Path:
    """Write ``where/normlab-NAME/`` (pyproject, module, tests, README); return the folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", name):
        raise UsageError(f"new-plugin {name!r}: expected a lower-case name of letters, digits and underscores "
                         f"starting with a letter (it is the run-file key and part of the module name)")
    if not where.is_dir():
        raise UsageError(f"new-plugin --dir {where}: " + ("not a directory" if where.exists() else
                                                           "no such directory (create it first)"))
    dash = name.replace("_", "-")
    root = where / f"normlab-{dash}"
    if root.exists():
        raise UsageError(f"new-plugin {name}: {root} already exists; choose another name or --dir")
    files = {
        root / "pyproject.toml": PYPROJECT.format(name=name, dash=dash),
        root / "README.md": README.format(name=name, dash=dash),
        root / "src" / f"normlab_{name}" / "__init__.py": MODULE.format(name=name),
        root / "src" / f"normlab_{name}" / "settings.py": SETTINGS.format(name=name),
        root / "tests" / f"test_{name}.py": TEST.format(name=name),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
