"""Start-up time of the command line: how long a bad run file takes to be refused, and `normlab plugins`.

Issue 16 asks that a bad run file be refused in under 1 s (before torch or timm is imported) and that
`normlab plugins` list from metadata. Each case runs as a fresh `python -m normlab.cli` process, so
imports are counted as a user meets them; printed are the median wall seconds over ``--repeats`` and
the exit status (2 for the refusals, 0 for the listing), and whether torch was imported on the way.

Usage::

    .venv/bin/python benchmarks/startup.py

Always exits 0 once the arguments parse: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "misspelled top-level key": ["run", "{file}", "--out", "{out}"],
    "bad --set value": ["run", "{good}", "--out", "{out}", "--set", "train.epochs=-1"],
    "unknown plugin": ["run", "{plugin}", "--out", "{out}"],
    "bad plugin setting": ["run", "{setting}", "--out", "{out}"],
    "bad evaluator setting": ["run", "{evaluator}", "--out", "{out}"],
    "plugins listing": ["plugins"],
}

PROBE = ("import runpy, sys; sys.argv = ['normlab'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('normlab.cli', run_name='__main__')\n"
         "finally:\n    print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"file": Path(tmp) / "bad.yaml", "good": Path(tmp) / "good.yaml", "plugin": Path(tmp) / "plugin.yaml",
                 "setting": Path(tmp) / "setting.yaml", "evaluator": Path(tmp) / "evaluator.yaml"}
        files["file"].write_text("trian: {epochs: 3}\n")
        files["good"].write_text("seed: 0\n")
        files["plugin"].write_text("plugins: {advnb: {}}\n")
        files["setting"].write_text("plugins: {bnrect: {n_smaples: 8}}\n")
        files["evaluator"].write_text("evaluate: {pgd: {eps: 8/255, stepz: 10}}\n")
        for name, argv in CASES.items():
            times, code, torch_line = [], None, ""
            for _ in range(args.repeats):
                cmd = [a.format(out=Path(tmp) / "out", **files) for a in argv]
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                code, torch_line = proc.returncode, proc.stderr.strip().splitlines()[-1]
            target = "" if name == "plugins listing" else " (target < 1 s)"
            print(f"startup: {name}: {statistics.median(times):.2f} s{target}, exit {code}, {torch_line}")


if __name__ == "__main__":
    main()
