"""``normlab launch FILE --grid KEY=V1,V2 ... --seeds 0,1,2``: a grid of runs, one job per point and seed,
through submitit (its local executor here, Slurm where it exists).

Layout of ``--out GROUP``: ``GROUP/launch.json`` (the run file, the grid, the seeds and each point's
overrides), and per point ``GROUP/<key=value,...>/``, a seed group as ``seeds:`` makes one
(``group.yaml``, ``seed-N/`` run directories, ``group.json``: per metric the mean over seeds and its 95%
interval), so ``normlab compare GROUP`` puts the points side by side with their intervals and paired tests.

Relaunching the same command skips every finished run (its ``results.json`` exists), resumes the
unfinished ones from their last checkpoint, and writes the summaries once all are done. Every point is
validated (run file, overrides, plugins, settings, the model and data built as a run builds them) before
the first job is submitted, so a bad grid value exits 2 with nothing written or submitted. Each job is
``normlab.runner.run`` in its own process, submitted by submitit (jobs and their logs under
``GROUP/.submitit``); with the local executor at most ``--parallel`` run at once (default 1: each run
already uses the machine's cores).
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from .config import _cut, safe_yaml
from .errors import RunFailure, UsageError
from .results import read_json, unmakeable_dir, write_json_atomic, write_text_atomic

__all__ = ["parse_grid", "launch", "run_point", "LAUNCH_FILE"]

LAUNCH_FILE = "launch.json"


def _split(values: str) -> list[str]:
    """Comma-separated values, commas inside brackets kept (``[0.5,1.0],[1.0]`` is two values)."""
    out, depth, cur = [], 0, ""
    for ch in values:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["train.lr=0.05,0.1", ...]`` as ``{"train.lr": ["0.05", "0.1"], ...}`` (values stay YAML text for
    ``--set``); one clear error naming the bad item."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise UsageError(f"--grid {item}: expected KEY=V1,V2,... (a run-file key such as train.lr)")
        if key in grid or key == "seed" or key == "seeds":
            raise UsageError(f"--grid {item}: " + ("use --seeds for seeds" if key.startswith("seed")
                                                   else f"{key} is given twice"))
        vals = [v.strip() for v in _split(values)]
        if not all(vals) or len(set(vals)) != len(vals):
            raise UsageError(f"--grid {item}: expected distinct, non-empty values")
        for v in vals:  # YAML as --set reads it, refused here under the flag that gave it
            safe_yaml(v, f"--grid {_cut(item)}")
        grid[key] = vals
    return grid


def point_name(point: dict[str, str]) -> str:
    """A point's directory name: ``key=value`` pairs joined by commas, characters outside [\\w.=,+-] as '_'."""
    raw = ",".join(f"{k.removeprefix('plugins.')}={v}" for k, v in point.items()) or "base"
    return "".join(c if c.isalnum() or c in "._=,+-" else "_" for c in raw)


def run_point(file: str, overrides: list[str], out: str, resume: bool) -> dict:
    """One job: ``normlab run FILE --set ... --out OUT [--resume]`` in this process; its metrics."""
    from .runner import run

    return dict(run(file, out=out, overrides=overrides, resume=resume, quiet=True).metrics)


def _executor(kind: str, folder: Path, slurm: dict, parallel: int):
    import submitit

    if kind == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {k: v for k, v in slurm.items() if v is not None and k not in ("timeout_min", "partition")}
        if slurm.get("partition"):
            params["slurm_partition"] = slurm["partition"]
        ex.update_parameters(timeout_min=slurm.get("timeout_min") or 24 * 60, slurm_array_parallelism=parallel,
                             **params)
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="local")
    ex.update_parameters(timeout_min=slurm.get("timeout_min") or 24 * 60)
    return ex


def launch(file: str, grid: dict[str, list[str]], seeds: list[int], out: str | Path, *, overrides: Sequence[str] = (),
           executor: str = "local", parallel: int = 1, slurm: dict | None = None, wait: bool = True,
           log=print) -> dict:
    """Run every (point, seed) not finished yet; write each point's group.json and GROUP/launch.json."""
    from .group import GROUP_YAML, seed_dir, summarize
    from .runner import _load_config, changed_group_setting, prepare

    out = Path(out)
    if not seeds:
        raise UsageError("--seeds: expected at least one seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds {','.join(map(str, seeds))}: expected each seed once, every one >= 0")
    why = unmakeable_dir(out)
    if why is not None:
        raise UsageError(f"--out {out}: {why}")
    if executor == "slurm" and shutil.which("sbatch") is None:  # before the group directory is written
        raise UsageError("--executor slurm: no Slurm on this machine (sbatch not found); use --executor local")
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    plan = {}
    for point in points:
        sets = [*overrides, *(f"{k}={v}" for k, v in point.items())]
        cfg, source = _load_config(str(file), [*sets, f"seed={seeds[0]}", "seeds=null"])
        # what a run refuses before it writes (model, data, weights): in any point, exit 2 before anything is
        # written or submitted; for Slurm on this machine's CPU (a login node may have no GPU: the jobs'
        # train.device is checked where they run)
        here = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})}) \
            if executor == "slurm" else cfg
        prepare(here, source).build()
        plan[point_name(point)] = {"overrides": sets, "config": cfg}
    out.mkdir(parents=True, exist_ok=True)
    saved = out / LAUNCH_FILE
    record = {"file": str(Path(file).resolve()), "grid": grid, "seeds": list(seeds), "overrides": list(overrides),
              "points": {name: p["overrides"] for name, p in plan.items()}}
    if saved.is_file():
        before = read_json(saved, "launch")
        if not isinstance(before, dict) or {k: before.get(k) for k in ("grid", "seeds", "overrides")} != \
                {k: record[k] for k in ("grid", "seeds", "overrides")}:
            raise UsageError(f"{saved}: this group was launched with another grid, seeds or overrides; "
                             f"choose another --out")
    for name, p in plan.items():  # the run file's content too: finished runs would be averaged with other settings
        p["group"] = p["config"].model_copy(update={"seeds": list(seeds), "seed": seeds[0]}).model_dump(mode="json")
        changed = changed_group_setting(out / name / GROUP_YAML, p["group"]) \
            if (out / name / GROUP_YAML).is_file() else None
        if changed is not None:
            key, was, is_ = changed
            raise UsageError(f"{out / name / GROUP_YAML}: {key}: this point was launched with {json.dumps(was)}, "
                             f"this run file gives {json.dumps(is_)}; relaunch with the same run file or choose "
                             f"another --out")
    write_json_atomic(saved, {**record, "status": "running"})
    jobs, skipped = [], 0
    for name, p in plan.items():
        point_dir = out / name
        point_dir.mkdir(exist_ok=True)
        write_text_atomic(point_dir / GROUP_YAML, yaml.safe_dump(p["group"], sort_keys=False))
        for s in seeds:
            run_dir = seed_dir(point_dir, s)
            if (run_dir / "results.json").is_file():
                skipped += 1
                continue
            resume = (run_dir / "run.yaml").is_file()
            jobs.append((name, s, [str(file), [*p["overrides"], f"seed={s}", "seeds=null"], str(run_dir), resume]))
    log(f"launch: {len(plan)} points x {len(seeds)} seeds; {skipped} finished runs skipped, {len(jobs)} to run "
        f"({executor} executor)")
    ex = _executor(executor, out / ".submitit", slurm or {}, parallel)
    failures = _submit(ex, executor, jobs, parallel, wait, log)
    if not wait:
        log(f"launch: submitted; relaunch the same command to collect the summaries ({out})")
        return record
    if failures:
        write_json_atomic(saved, {**record, "status": "failed", "failed": failures})
        raise RunFailure(f"{len(failures)} of {len(jobs)} runs failed ({', '.join(failures)}); their logs are under "
                         f"{out / '.submitit'}; relaunch to resume them")
    for name in plan:
        summarize(out / name, list(seeds))
    write_json_atomic(saved, {**record, "status": "done"})
    return record


def _submit(ex, kind: str, jobs: list, parallel: int, wait: bool, log) -> list[str]:
    """Submit the jobs (local: at most ``parallel`` at a time; Slurm: one array); the failed ones' names."""
    failures: list[str] = []
    if kind == "slurm":
        with ex.batch():
            handles = [(name, s, ex.submit(run_point, *args)) for name, s, args in jobs]
        if wait:
            for name, s, job in handles:
                failures += _collect(name, s, job, log)
        return failures
    running: list = []
    for name, s, args in jobs:
        while len(running) >= parallel:
            running, done = _partition(running)
            for n, sd, job in done:
                failures += _collect(n, sd, job, log)
            if len(running) >= parallel:
                time.sleep(0.5)
        running.append((name, s, ex.submit(run_point, *args)))
    for name, s, job in running:
        failures += _collect(name, s, job, log)
    return failures


def _partition(running: list) -> tuple[list, list]:
    done = [r for r in running if r[2].done()]
    return [r for r in running if not r[2].done()], done


def _collect(name: str, seed: int, job, log) -> list[str]:
    try:
        job.result()
    except Exception as e:  # submitit's FailedJobError carries the job's stderr
        last = str(e).strip().splitlines()[-1:] or [type(e).__name__]
        log(f"launch: {name} seed {seed}: failed: {last[0][:200]}")
        return [f"{name}/seed-{seed}"]
    log(f"launch: {name} seed {seed}: done")
    return []


def expand(path: str | Path) -> list[str] | None:
    """A launch group's point directories (for ``normlab compare GROUP``), or None for any other path."""
    saved = Path(path) / LAUNCH_FILE
    if not saved.is_file():
        return None
    record = read_json(saved, "launch")
    points = record.get("points") if isinstance(record, dict) else None
    if not isinstance(points, dict) or not all(isinstance(n, str) and n and "/" not in n for n in points):
        raise UsageError(f"{saved}: points: expected a mapping of point names to their --set values")
    return [str(Path(path) / name) for name in points]


def main_args(p) -> None:
    """The ``launch`` subcommand's arguments."""
    p.add_argument("file", help="run file (YAML)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a run-file key and its values (repeatable; every combination is a point)")
    p.add_argument("--seeds", default="0", help="comma list of seeds, one run each per point (default 0)")
    p.add_argument("--out", required=True, help="the group directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every point")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (local), array parallelism (Slurm)")
    p.add_argument("--slurm-partition", dest="partition")
    p.add_argument("--slurm-time", dest="timeout_min", type=int, metavar="MINUTES", help="time limit per run")
    p.add_argument("--slurm-gpus-per-node", dest="gpus_per_node", type=int)
    p.add_argument("--slurm-cpus-per-task", dest="cpus_per_task", type=int)
    p.add_argument("--slurm-mem-gb", dest="mem_gb", type=int)
    p.add_argument("--no-wait", dest="wait", action="store_false", help="submit and return (Slurm)")


def from_args(args) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds}: expected a comma list of integers") from None
    if args.parallel < 1:
        raise UsageError(f"--parallel: expected at least 1, got {args.parallel}")
    slurm = {"partition": args.partition, "timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_node,
             "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb}
    launch(args.file, parse_grid(args.grid), seeds, args.out, overrides=args.overrides, executor=args.executor,
           parallel=args.parallel, slurm=slurm, wait=args.wait, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.wait:
        print(f"launch group: {args.out} (compare it: normlab compare {args.out})")
    return 0
