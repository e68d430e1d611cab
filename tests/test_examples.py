"""Every run file under examples/ passes the command line's check (the file, the evaluators' settings, the
plugin names and every plugin's settings), so a README command never starts on a broken example."""

from pathlib import Path

import pytest

from normlab.cli import precheck

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").rglob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 15 and any(p.parent.name == "nofrost26" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_example_passes_the_check(path):
    precheck(str(path), [])
