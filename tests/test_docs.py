"""The Python blocks of docs/plugins.md run, in order, in one namespace (``OUT`` is a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.usefixtures("one_thread")
def test_the_plugin_guide_examples_run(tmp_path):
    code = blocks()
    assert len(code) >= 4
    namespace = {"OUT": tmp_path, "__name__": "plugins_md"}
    for i, block in enumerate(code):
        exec(compile(block, f"{DOC}:block{i + 1}", "exec"), namespace)


def test_every_public_name_in_the_guide_imports():
    import importlib

    rows = re.findall(r"^\| `([^`]+)`", DOC.read_text(), flags=re.M)
    for row in rows:
        path = row.split(",")[0].strip()
        module, _, attr = path.rpartition(".")
        if not module:
            continue
        obj = importlib.import_module(module)
        assert hasattr(obj, attr), path
