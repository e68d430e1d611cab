"""Reading a run directory's ``results.json`` (no torch: ``normlab show`` and ``compare`` import only this)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UsageError

__all__ = ["read_results"]

MAX_RESULTS_BYTES = 64 << 20


def read_results(run_dir: str | Path, required: bool = True) -> dict:
    """The parsed ``results.json`` of ``run_dir``, checked; ``{}`` when absent and not ``required``.

    A file that is not JSON, whose ``metrics`` is not a mapping of finite numbers, or whose
    ``records`` is not a mapping is a UsageError of one line naming the file and the key.
    """
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        if required:
            raise UsageError(f"{run_dir}: no results.json (not a finished normlab run)")
        return {}
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise UsageError(f"{path}: larger than {MAX_RESULTS_BYTES} bytes; not a normlab results file")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise UsageError(f"{path}: expected an object with a `metrics` mapping")
    for key, value in results["metrics"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{path}: metrics.{key}: expected a finite number, got {str(value)[:60]!r}")
    for section in ("records", "timing", "plugins"):
        if not isinstance(results.get(section, {}), dict):
            raise UsageError(f"{path}: {section}: expected a mapping")
    return results
