"""scripts/gpu_check on the CPU: the script's own code path (the GPU figures come from a GPU machine)."""

import subprocess
import sys

import pytest

from conftest import TESTS, subprocess_env


@pytest.mark.slow
def test_gpu_check_runs_its_cases_on_the_cpu_and_fails_loudly():
    script = str(TESTS.parent / "scripts" / "gpu_check")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--tiny", "--skip", "quickstart,attacks",
                           "--cases", "plain; slim + condition + pgd (OATS)"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "plain hand-written loop" in proc.stdout and "x plain" in proc.stdout
    assert "slim + condition + pgd (OATS)" in proc.stdout and "gpu_check: all passed" in proc.stdout
    bad = subprocess.run([sys.executable, script, "--device", "cpu", "--tiny", "--skip", "quickstart,attacks",
                          "--cases", "no such case"], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert bad.returncode == 1 and "FAILED: gpu_check in section" in bad.stdout
