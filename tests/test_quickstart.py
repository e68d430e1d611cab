"""The README's quickstart, end to end through the CLI: the accuracy it promises and the results table.

Its time and memory are measured by benchmarks/quickstart.py, not asserted here: machines of this
kind differ several-fold in speed, and a test that asserts wall time fails on the slow ones.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_reaches_95_percent_and_prints_the_table(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "normlab.cli", "run", str(ROOT / "examples" / "quickstart.yaml"),
                           "--out", str(out)], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["clean/acc"] >= 0.95
    table = [line.split()[:2] for line in proc.stdout.splitlines()]
    assert ["clean/acc", f"{metrics['clean/acc']:.4f}"] in table  # the results table shows the stored value
    row = next(line for line in proc.stdout.splitlines() if line.startswith("clean/acc "))
    assert f"[{metrics['clean/acc/ci_low']:.4f}, {metrics['clean/acc/ci_high']:.4f}]" in row  # and its interval


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_run_file_is_valid(path):
    """Each example validates as `normlab run` would before building: keys, plugins (installed, requires,
    conflicts, order), each plugin's and evaluator's settings, sweep knobs."""
    from normlab.config import load_run_file
    from normlab.runner import prepare

    cfg, _ = load_run_file(path)
    run = prepare(cfg, str(path), quiet=True)
    assert run.enabled == list(cfg.plugins)
