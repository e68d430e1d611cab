"""Every hook is documented: its arguments, what a return value means, how plugins chain."""

import inspect
import re
from pathlib import Path

import pytest

from normlab import hookspecs
from normlab.manager import CHAINED

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ["on_model", "on_batch_norm", "on_feature", "on_batch", "on_loss", "on_domain", "on_choices", "on_epoch",
         "on_eval", "on_log"]


def test_the_ten_hooks_exist_and_nothing_else():
    specs = sorted(n for n, f in vars(hookspecs).items() if callable(f) and n.startswith("on_"))
    assert specs == sorted(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_docstring_covers_arguments_return_and_chaining(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    for arg in inspect.signature(fn).parameters:
        assert re.search(rf":param {arg}:", doc), f"{name}: argument {arg!r} undocumented"
    assert ":return:" in doc, f"{name}: return value undocumented"
    if name in CHAINED:
        assert "Chained" in doc and CHAINED[name] in inspect.signature(fn).parameters
    else:
        assert "Called for every plugin" in doc, f"{name}: calling convention undocumented"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_in_the_design_doc_and_readme(name):
    assert f"`{name}`" in (ROOT / "docs" / "design.md").read_text() or name in (ROOT / "docs" / "design.md").read_text()
    assert name in (ROOT / "README.md").read_text(), f"README does not mention {name}"
