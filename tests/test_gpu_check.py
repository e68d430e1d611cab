"""scripts/gpu_check on the CPU: the script's own code path (the GPU figures come from a GPU machine)."""

import subprocess
import sys

import pytest

from conftest import TESTS, subprocess_env

SCRIPT = str(TESTS.parent / "scripts" / "gpu_check")


def gpu_check(*args, **env):
    return subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", *args], capture_output=True,
                          text=True, env=subprocess_env(**env), timeout=600)


@pytest.mark.slow
def test_gpu_check_runs_its_cases_on_the_cpu_and_fails_loudly():
    proc = gpu_check("--skip", "quickstart,attacks", "--cases", "plain; condition + pgd (OAT)")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "plain hand-written loop" in proc.stdout and "x plain" in proc.stdout
    assert "condition + pgd (OAT)" in proc.stdout and "gpu_check: all passed" in proc.stdout
    # a machine where a plugin is missing: the case that needs it fails, with its section named
    bad = gpu_check("--skip", "quickstart,attacks", "--cases", "pgd (PGD-AT)", NORMLAB_LOAD_PLUGINS="condition")
    assert bad.returncode == 1 and "FAILED: gpu_check in section 'case pgd (PGD-AT)'" in bad.stdout, bad.stdout
    assert "'pgd' is installed, but NORMLAB_LOAD_PLUGINS='condition' leaves it out" in bad.stderr


def test_an_unknown_case_or_section_is_refused_before_anything_runs():
    for flag, value, unknown in (("--cases", "plain; no such case", "no such case"),
                                 ("--skip", "quickstart,atacks", "atacks")):
        proc = gpu_check(flag, value)
        assert proc.returncode == 2 and f"{flag}: unknown '{unknown}'; expected one of: " in proc.stderr, proc.stderr
        assert "gpu_check: torch" not in proc.stdout  # nothing ran
