"""The README's quickstart, end to end through the CLI: accuracy, time and memory targets."""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_reaches_95_percent_in_3_minutes_under_3_gb(tmp_path):
    out = tmp_path / "quickstart"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "normlab.cli", "run", str(ROOT / "examples" / "quickstart.yaml"),
                           "--out", str(out)], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    print(f"quickstart: clean/acc {metrics['clean/acc']:.4f}, {seconds:.1f} s, peak {peak_gb:.2f} GB")
    assert metrics["clean/acc"] >= 0.95
    assert seconds < 180
    assert peak_gb < 3.0
    assert "clean/acc" in proc.stdout  # the results table


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_run_file_is_valid(path):
    """Each example validates as `normlab run` would before building: keys, plugins (installed, requires,
    conflicts, order), each plugin's and evaluator's settings, sweep knobs."""
    from normlab.config import load_run_file
    from normlab.runner import prepare

    cfg, _ = load_run_file(path)
    run = prepare(cfg, str(path), quiet=True)
    assert run.enabled == list(cfg.plugins)
