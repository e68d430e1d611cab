"""Seed groups: ``seeds: [0, 1, 2]`` runs one run per seed into ``OUT/seed-N`` and summarises them.

``OUT/group.yaml`` is the run file with its seeds (what ``--resume`` checks); ``OUT/group.json`` holds,
for every metric that all the group's runs report, the values per seed, their mean and a 95% Student t
interval over seeds (:func:`normlab.stats.seed_interval`; an accuracy's clipped to [0, 1]). Per-example
intervals (``<key>/ci_low``) stay in each run's results.json. No torch here: ``normlab show`` and
``compare`` read groups.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import UsageError
from .results import is_number, read_json, read_results, write_json_atomic

__all__ = ["GROUP_FILE", "GROUP_YAML", "is_group", "seed_dir", "summarize", "read_group"]

GROUP_FILE = "group.json"
GROUP_YAML = "group.yaml"
RULE = "mean over seeds with a 95% Student t interval (scipy.stats.t, n - 1 degrees of freedom)"


def is_group(path: str | Path) -> bool:
    return (Path(path) / GROUP_YAML).is_file()


def seed_dir(group_dir: str | Path, seed: int) -> Path:
    return Path(group_dir) / f"seed-{seed}"


def _interval_key(key: str) -> bool:
    return key.endswith(("/ci_low", "/ci_high"))


def summarize(group_dir: str | Path, seeds: list[int]) -> dict:
    """Write ``group.json`` from the seed runs' results.json and return it."""
    from .stats import seed_interval

    results = {s: read_results(seed_dir(group_dir, s)) for s in seeds}
    runs = {s: r["metrics"] for s, r in results.items()}
    first = runs[seeds[0]]
    keys = [k for k in first if not _interval_key(k) and all(k in m for m in runs.values())]
    metrics = {}
    for k in keys:
        values = [runs[s][k] for s in seeds]
        mean, lo, hi = seed_interval(values)
        if k.endswith(("acc", "/top5")):  # an accuracy's interval stays inside [0, 1]
            lo, hi = max(0.0, lo), min(1.0, hi)
        metrics[k] = {"mean": mean, "ci_low": lo, "ci_high": hi, "values": values}
    costs = [r.get("cost", {}) for r in results.values()]
    cost = {k: sum(c[k] for c in costs) / len(costs) for k in costs[0] if all(k in c for c in costs)}
    group = {"seeds": list(seeds), "runs": {str(s): seed_dir(group_dir, s).name for s in seeds}, "rule": RULE,
             "metrics": metrics, "cost": cost}
    write_json_atomic(Path(group_dir) / GROUP_FILE, group)
    return group


def read_group(group_dir: str | Path) -> dict:
    """The parsed ``group.json``, checked: one line naming the file and key when it is not a group summary."""
    path = Path(group_dir) / GROUP_FILE
    if not path.is_file():
        raise UsageError(f"{group_dir}: no {GROUP_FILE} (the seed group has not finished: rerun with --resume)")
    group = read_json(path, "group")
    seeds = group.get("seeds") if isinstance(group, dict) else None
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UsageError(f"{path}: seeds: expected a list of integers")
    if not isinstance(group.get("metrics"), dict):
        raise UsageError(f"{path}: metrics: expected a mapping")
    for key, m in group["metrics"].items():
        fields = ("mean", "ci_low", "ci_high")
        if not isinstance(m, dict) or not all(isinstance(m.get(f), (int, float)) and math.isfinite(m[f])
                                              for f in fields) \
                or not isinstance(m.get("values"), list) or len(m["values"]) != len(seeds) \
                or not all(is_number(v) for v in m["values"]):
            raise UsageError(f"{path}: metrics.{key}: expected mean, ci_low, ci_high and one number per seed")
    return group
