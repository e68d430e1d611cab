"""``normlab`` command line: run, eval, plugins, new-plugin, show, compare.

Exit status 0 on success, 2 on bad input (one line naming the file, key and
what was expected), 1 on a failure during the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from .errors import RunFailure, UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normlab", description="Robustness methods on normalization layers, as plugins.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and evaluate from a run file")
    r.add_argument("file", help="run file (YAML)")
    r.add_argument("--out", help="run directory (default: runs/<file>-<time>)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-file key, e.g. --set train.epochs=5 (repeatable)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine: the same as torchrun --standalone "
                        "--nproc_per_node N -m normlab.cli run FILE ... (data.batch_size is the global batch)")

    e = sub.add_parser("eval", help="evaluate a finished run again without training")
    e.add_argument("run_dir")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--as", dest="name", metavar="NAME",
                   help="store the new metrics as NAME/<key> beside the earlier ones")
    e.add_argument("--quiet", action="store_true")

    pl = sub.add_parser("plugins", help="list installed plugins, or show one plugin's settings")
    pl.add_argument("name", nargs="?", help="a plugin: its hooks and its settings with defaults")
    pl.add_argument("--json", action="store_true", help="machine-readable output (imports the plugins)")
    pl.add_argument("--check", action="store_true",
                    help="import every plugin: its hooks, declarations and import errors (the plain listing "
                         "reads the installed metadata only, without importing torch)")

    n = sub.add_parser("new-plugin", help="write a new plugin package from the template")
    n.add_argument("name", help="the plugin's run-file name (lower case, digits, underscores)")
    n.add_argument("--dir", default=".", help="where to create normlab-NAME/ (default: here)")

    s = sub.add_parser("show", help="print a run's results table")
    s.add_argument("run_dir")
    s.add_argument("--all", action="store_true", help="every key, per-severity corruption keys included")

    from .launch import main_args

    main_args(sub.add_parser("launch", help="a grid of runs (points x seeds) through submitit: local or Slurm"))

    c = sub.add_parser("compare", help="print runs side by side")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR[:NAME]",
                   help="a run directory, a seed group or a launch group (its points); RUN_DIR:NAME shows the "
                        "metrics stored by `normlab eval RUN_DIR --as NAME`")
    c.add_argument("--keys", help="comma list of metric keys, or semicolon list where keys hold commas (a grid "
                                  "sweep's); default: the headline metrics present")
    c.add_argument("--cost", action="store_true", help="also show each run's cost: training images per second, "
                                                        "FLOPs of a training step, peak memory, evaluators' seconds "
                                                        "per image")
    c.add_argument("--plot", metavar="PNG", help="also write the standard-accuracy / robust-accuracy plane: "
                                                   "each run's point, each sweep's curve")
    return p


HEADLINE = ("clean/acc", "pgd/acc", "pgd/adaptive/acc", "autoattack/acc", "autoattack/adaptive/acc",
            "corruptions/acc", "corruptions/mce", "corruptions/error", "style/acc")


def _detail(key: str) -> bool:
    """Per-severity corruption keys and per-layer divergence keys: shown with --all only, also under a named
    evaluation (``NAME/``), a sweep point (``sweep/KNOB=V/``) or a plugin's prefix (``bnrect/``)."""
    parts = key.split("/")
    for at, part in enumerate(parts):
        if part in ("corruptions", "divergence"):
            rest = parts[at:]
            return (part == "corruptions" and len(rest) == 4) or (part == "divergence" and rest[-1] != "mean")
    return False


def _interval_key(key: str) -> bool:
    return key.endswith(("/ci_low", "/ci_high"))


def _interval(metrics: dict, key: str) -> str:
    lo, hi = metrics.get(f"{key}/ci_low"), metrics.get(f"{key}/ci_high")
    return f"[{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else ""


def _value(v: float) -> str:
    """A metric as the tables print it: 4 decimals, or 4 significant digits for counts such as FLOPs."""
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"


def results_table(results: dict, everything: bool = True) -> str:
    """The results table of a results.json mapping: each metric, and the 95% interval over test examples of
    each accuracy (Wilson; a normal interval of the mean for averages over domains)."""
    metrics = results.get("metrics", {})
    keys = [k for k in metrics if not _interval_key(k) and (everything or not _detail(k))]
    if not keys:
        return "(no metrics)"
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  value   95% interval", f"{'-' * width}  ------  ----------------"]
    lines += [f"{k:<{width}}  {_value(metrics[k])}  {_interval(metrics, k)}".rstrip() for k in keys]
    timing = results.get("timing", {})
    if timing:
        lines.append("")
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timing.items()))
    return "\n".join(lines)


def group_table(group: dict, everything: bool = True) -> str:
    """A seed group's table: per metric the mean over seeds, its 95% t interval and the value of each seed."""
    metrics = {k: m for k, m in group["metrics"].items() if everything or not _detail(k)}
    if not metrics:
        return "(no metrics)"
    seeds = group["seeds"]
    width = max(len(k) for k in metrics)
    per_seed = "  ".join(f"{'seed ' + str(s):>7}" for s in seeds)
    lines = [f"{'metric':<{width}}  mean    95% interval (seeds)  " + per_seed,
             f"{'-' * width}  ------  --------------------  " + "  ".join("-" * 7 for _ in seeds)]
    for k, m in metrics.items():
        cells = "  ".join(f"{v:>7.4f}" for v in m["values"])
        interval = f"[{m['ci_low']:.4f}, {m['ci_high']:.4f}]" if len(seeds) > 1 else "(one seed: none)"
        lines.append(f"{k:<{width}}  {m['mean']:.4f}  {interval:<20}  {cells}")
    lines.append("")
    lines.append(f"{len(seeds)} seeds: {', '.join(map(str, seeds))}; {group.get('rule', '')}")
    return "\n".join(lines)


def _settings(plugin) -> list[dict]:
    """A plugin's settings from its ``Config``: name, type, default, description."""
    model = getattr(plugin, "Config", None)
    if model is None or not hasattr(model, "model_fields"):
        return []
    out = []
    for key, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        ann = field.annotation
        kind = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        out.append({"name": key, "type": kind, "default": default, "description": field.description or ""})
    return out


def _head(name: str, version: str | None, distribution: str | None, package: str | None) -> str:
    """A plugin's first line in every listing: ``name version (distribution, package)``."""
    return f"{name} {version or ''} ({distribution or '?'}, {package})"


def _none_listed() -> str:
    chosen = os.environ.get("NORMLAB_LOAD_PLUGINS")
    return "no plugins installed" if chosen is None else f"no plugins loaded (NORMLAB_LOAD_PLUGINS={chosen!r})"


def _listing() -> int:
    """Installed plugins from their entry points' metadata (nothing imported): name, version, distribution."""
    import importlib.metadata as md

    from normlab_registry import CATALOGUE

    from .manager import GROUP, allowed_names

    allowed = allowed_names()
    eps = sorted((ep for ep in md.entry_points(group=GROUP) if allowed is None or ep.name in allowed),
                 key=lambda ep: ep.name)
    if not eps:
        print(_none_listed())
        return EXIT_OK
    for ep in eps:
        dist = getattr(ep, "dist", None)
        name, version = (dist.metadata["Name"], dist.version) if dist else (None, None)
        summary = CATALOGUE[ep.name].summary if ep.name in CATALOGUE else (dist.metadata["Summary"] if dist else "")
        print(_head(ep.name, version, name, ep.value))
        if summary:
            print(f"  {summary}")
    print("(hooks, declarations and import errors: normlab plugins --check; settings: normlab plugins NAME)")
    return EXIT_OK


def _plugins(as_json: bool, name: str | None = None, check: bool = False) -> int:
    if name is None and not as_json and not check:
        return _listing()
    from .manager import discover

    found = discover()
    if name is not None:
        if name not in found:
            from normlab_registry import did_you_mean

            raise UsageError(f"plugins {name}: no installed plugin of that name"
                             + did_you_mean(name, list(found)) + f"; installed: {', '.join(sorted(found)) or '-'}")
        info = found[name]
        record = {**info.as_dict(), "settings": _settings(info.plugin) if info.error is None else []}
        if as_json:
            print(json.dumps(record, indent=2, default=str))
            return EXIT_OK
        print(_head(name, record["version"], record["distribution"], record["package"]))
        doc = (getattr(info.plugin, "__doc__", None) or "").strip().splitlines()
        if doc:
            print(f"  {doc[0]}")
        if info.error:
            print(f"  error: {info.error}")
            return EXIT_OK
        print(f"  hooks: {', '.join(record['hooks']) or '-'}")
        settings = record["settings"]
        if not settings:
            print("  settings: none")
        else:
            print(f"  settings (plugins: {{{name}: {{...}}}}):")
            width = max(len(f["name"]) for f in settings)
            for f in settings:
                print(f"    {f['name']:<{width}}  {f['type']} = {f['default']!r}  {f['description']}")
        return EXIT_OK
    infos = [i.as_dict() for _, i in sorted(found.items())]
    if as_json:
        print(json.dumps(infos, indent=2))
        return EXIT_OK
    if not infos:
        print(_none_listed())
        return EXIT_OK
    for i in infos:
        head = _head(i["name"], i["version"], i["distribution"], i["package"])
        print(head)
        if i["error"]:
            print(f"  error: {i['error']}")
            continue
        print(f"  hooks: {', '.join(i['hooks']) or '-'}")
        for key in ("requires", "conflicts", "after", "knobs"):
            if i[key]:
                print(f"  {key}: {', '.join(i[key])}")
    return EXIT_FAILURE if check and any(i["error"] for i in infos) else EXIT_OK  # a check that found errors


def _results(run_dir: str) -> dict:
    from .results import read_results

    return read_results(run_dir)


def _show(run_dir: str, everything: bool) -> int:
    from .group import is_group, read_group
    from .launch import expand

    points = expand(run_dir)
    if points is not None:  # a launch group: each point's seed-group table
        for i, point in enumerate(points):
            if i:
                print()
            print(f"point {Path(point).name}:")
            _show(point, everything)
        return EXIT_OK
    if is_group(run_dir):
        group = read_group(run_dir)
        print(group_table(group, everything))
        hidden = [k for k in group["metrics"] if _detail(k)]
    else:
        results = _results(run_dir)
        print(results_table(results, everything))
        hidden = [k for k in results["metrics"] if _detail(k) and not _interval_key(k)]
    if hidden and not everything:
        print(f"({len(hidden)} per-severity/per-layer keys hidden; --all shows them)")
    plots = sorted((Path(run_dir) / "plots").glob("*.png"))
    if plots:
        print("plots: " + ", ".join(str(p) for p in plots))
    return EXIT_OK


class _Entry:
    """One column of ``normlab compare``: a run (its metrics, per-example outcomes) or a seed group."""

    def __init__(self, spec: str):
        from .group import is_group, read_group

        d, prefix = spec, None
        if not Path(d).exists() and ":" in d:
            d, prefix = d.rsplit(":", 1)
        where = Path(d).resolve()
        name = f"{where.parent.name}/{where.name}" if where.name.startswith("seed-") else where.name  # a group's run
        self.dir, self.prefix, self.name = Path(d), prefix, name + (f":{prefix}" if prefix else "")
        self.group = read_group(d) if is_group(d) else None
        if self.group is not None:
            if prefix:
                raise UsageError(f"{spec}: a seed group has no named evaluations; compare its seed runs instead")
            self.metrics = {k: m["mean"] for k, m in self.group["metrics"].items()}
            self.intervals = {k: (m["ci_low"], m["ci_high"]) for k, m in self.group["metrics"].items()
                              if len(self.group["seeds"]) > 1}  # one seed: no interval over seeds
            self.seed = ",".join(map(str, self.group["seeds"]))
            self.cost = self.group.get("cost", {})
            return
        results = _results(d)
        metrics = results["metrics"]
        if prefix:
            metrics = {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(prefix + "/")}
            if not metrics:
                raise UsageError(f"{d}: no metrics stored under {prefix!r} (run `normlab eval {d} --as {prefix}`)")
        self.results = {**results, "metrics": metrics}
        self.metrics = {k: v for k, v in metrics.items() if not _interval_key(k)}
        self.intervals = {k: (metrics[f"{k}/ci_low"], metrics[f"{k}/ci_high"]) for k in self.metrics
                          if f"{k}/ci_low" in metrics and f"{k}/ci_high" in metrics}
        self.seed = str(results.get("seed", "?"))
        self.cost = {} if prefix else results.get("cost", {})
        self._outcomes = None

    def outcomes(self) -> dict:
        """key -> (scores, examples id, binary, parts) with keys (and the parts' keys) relative to the entry's
        evaluation name; {} for a run evaluated before outcomes were stored."""
        if self._outcomes is None:
            from .results import OUTCOMES, read_outcomes

            found = read_outcomes(self.dir) if (self.dir / OUTCOMES).is_file() else {}
            if self.prefix:
                cut = len(self.prefix) + 1

                def relative(parts):
                    return tuple((k[cut:], relative(p)) for k, p in parts)

                found = {k[cut:]: (*v[:3], relative(v[3])) for k, v in found.items() if k.startswith(self.prefix + "/")}
            self._outcomes = found
        return self._outcomes


def _unordered(parts: tuple) -> tuple:
    """An average's parts without their order (a mean does not depend on it), nested ones included."""
    return tuple(sorted((k, _unordered(p)) for k, p in parts))


def paired_test(a: _Entry, b: _Entry, key: str) -> tuple[float, float | None, str]:
    """(b - a, p-value, the test's name) for one metric of two compare entries; where no test applies,
    (b - a, None, why not)."""
    from . import stats

    diff = b.metrics[key] - a.metrics[key]
    if a.group is not None and b.group is not None:
        va, vb = a.group["metrics"][key]["values"], b.group["metrics"][key]["values"]
        if sorted(a.group["seeds"]) == sorted(b.group["seeds"]) and len(va) > 1:  # paired by seed, in any order
            vb = [vb[b.group["seeds"].index(seed)] for seed in a.group["seeds"]]
            return diff, stats.paired_seeds(vb, va)["p"], "paired t over seeds"
        if len(va) > 1 and len(vb) > 1:
            from scipy.stats import ttest_ind

            return diff, float(ttest_ind(vb, va, equal_var=False).pvalue), "Welch t over seeds"
        return diff, None, "a group of one seed has no spread over seeds"
    if a.group is None and b.group is None:
        oa, ob = a.outcomes().get(key), b.outcomes().get(key)
        if oa is None or ob is None:
            return diff, None, "no per-example outcomes stored for the key"
        if oa[1] != ob[1]:
            return diff, None, "the runs were evaluated on different test examples"
        if _unordered(oa[3]) != _unordered(ob[3]):
            return diff, None, "the averages are over different parts"
        if stats.right_or_wrong(oa[0]) and stats.right_or_wrong(ob[0]):
            return diff, stats.mcnemar(ob[0] > 0.5, oa[0] > 0.5)["p"], "McNemar exact"
        if oa[0].size < 2:
            return diff, None, "one example has no spread to test"
        return diff, stats.paired_examples(ob[0], oa[0])["p"], "paired t over examples"
    return diff, None, "a run and a seed group are not paired"


COST = ("train/images_per_s", "train/step_flops", "peak_memory_mb")


def compare_table(entries: list[_Entry], keys: list[str] | None = None, cost: bool = False) -> str:
    """Runs (or seed groups) side by side: one row per metric, one column per entry with its 95% interval;
    each entry after the first also gets its difference from the first with a paired test's p-value,
    ``*`` where p < 0.05 and ``n.s.`` where not."""
    from .stats import ALPHA

    if keys is None:
        present = list(dict.fromkeys(k for e in entries for k in e.metrics))  # evaluation order
        keys = [k for k in HEADLINE if k in present]
        keys += [k for k in present if k.split("/")[0] in ("corruptions", "style") and k.count("/") == 2]
        keys += sorted(k for k in present if k.startswith("sweep/") and k.count("/") == 3 and k.endswith("/acc"))
        keys += [k for k in present if k.endswith("/flops")]  # the cost of a forward per width (slim)
    base, rest = entries[0], entries[1:]
    header = ["metric"] + [e.name for e in entries] + [f"{e.name} - {base.name}" for e in rest]
    rows, tests, untested = [], set(), set()
    for k in keys:
        row = [k]
        for e in entries:
            if k not in e.metrics:
                row.append("-")
            else:
                lo_hi = e.intervals.get(k)
                row.append(_value(e.metrics[k]) + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""))
        for e in rest:
            if k not in e.metrics or k not in base.metrics:
                row.append("-")
                continue
            diff, p, test = paired_test(base, e, k)
            if p is None:
                untested.add(test)
                row.append((f"{diff:+.4f}" if abs(diff) < 1e5 else f"{diff:+.4g}") + " untested")
            else:
                tests.add(test)
                row.append(f"{diff:+.4f} p={p:.3g} " + ("*" if p < ALPHA else "n.s."))
        rows.append(row)
    if cost:
        present = list(dict.fromkeys(k for e in entries for k in e.cost))
        per_image = [k for k in present if k.endswith("/seconds_per_image")]
        for k in [c for c in COST if c in present] + per_image:
            rows.append([f"cost: {k}"] + [f"{e.cost[k]:.4g}" if k in e.cost else "-" for e in entries]
                        + [""] * len(rest))
    rows.append(["seed"] + [e.seed for e in entries] + [""] * len(rest))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    if rest:
        lines.append("")
        lines.append(f"differences: entry minus {base.name}; * p < {ALPHA}, n.s. not significant"
                     + (f" ({'; '.join(sorted(tests))})" if tests else "")
                     + "; intervals: 95% (over test examples for a run, over seeds for a group)"
                     + (f"; untested: {'; '.join(sorted(untested))}" if untested else ""))
    return "\n".join(lines).rstrip()


def _compare(run_dirs: list[str], keys: str | None, plot: str | None = None, cost: bool = False) -> int:
    from .launch import expand
    from .results import unwritable_folder

    if plot is not None:  # refused before anything is read, as a bad --out is
        where = Path(plot)
        if where.suffix.lower() != ".png":
            raise UsageError(f"--plot {plot}: expected a file name ending in .png")
        if where.is_dir():
            raise UsageError(f"--plot {plot}: expected a file; a directory of that name exists")
        parent = unwritable_folder(where.parent)
        if parent is not None:
            raise UsageError(f"--plot {plot}: cannot write there ({parent} is not a writable directory)")
    entries = []
    for d in [p for d in run_dirs for p in (expand(d) or [d])]:  # a launch group: its points
        e = _Entry(d)
        while e.name in [x.name for x in entries]:
            e.name += "'"
        entries.append(e)
    wanted = None
    if keys is not None:
        sep = ";" if ";" in keys else ","  # grid sweeps' keys hold commas (sweep/lam=0,width=1.0/...)
        wanted = [k.strip() for k in keys.split(sep) if k.strip()]
        held = list(dict.fromkeys(k for e in entries for k in e.metrics))
        unknown = [k for k in wanted if k not in held]
        if not wanted or unknown:
            shown = [k for k in held if not _interval_key(k)]
            listed = ", ".join(shown[:12]) + (f" and {len(shown) - 12} more (normlab show RUN --all)"
                                              if len(shown) > 12 else "")
            raise UsageError(f"--keys {keys!r}: " + (f"{unknown[0]!r} is in none of the runs" if unknown
                             else "expected a comma list of metric keys") + f"; they hold: {listed}")
    print(compare_table(entries, wanted, cost))
    if plot:
        from .plots import sara_plot

        runs = {e.name: {"metrics": e.metrics} for e in entries}
        written = sara_plot(runs, Path(plot))
        print(f"plot: {written}" if written else "plot: no run has both a clean and an attack accuracy")
    return EXIT_OK


def precheck(path: str, overrides: list[str]) -> None:
    """What can be checked without torch: the run file and its overrides, the evaluators' settings,
    the plugin names and the settings of plugins that keep them in ``settings.py``.

    The names are resolved against the installed entry points' metadata (nothing is imported), so
    an unknown, uninstalled or excluded plugin is refused with the same line the full check gives;
    requirements, conflicts and the rest are checked again by :func:`normlab.runner.prepare`.
    """
    import importlib.metadata as md

    from normlab_registry import PluginSpec, ResolutionError, resolve

    from .config import load_run_file, validate_section
    from .evals.settings import validate_evaluators
    from .manager import GROUP, refuse_excluded

    cfg, _ = load_run_file(path, overrides)
    validate_evaluators(cfg.evaluate, path)
    if not cfg.plugins:
        return
    refuse_excluded(list(cfg.plugins), path)
    eps = {ep.name: ep for ep in md.entry_points(group=GROUP)}
    try:
        resolve(list(cfg.plugins), {n: PluginSpec(n) for n in eps})
    except ResolutionError as e:
        raise UsageError(f"{path}: plugins: {e}") from None
    for name, settings in cfg.plugins.items():
        model = settings_model(eps[name].value)
        if model is not None:
            validate_section(model, settings, path, f"plugins.{name}")


def settings_model(target: str):
    """The ``Config`` of a plugin package's ``settings.py``, loaded from its file without the package.

    The convention that makes a plugin's settings checkable before torch is imported: a plugin whose
    entry point is a package (``normlab_bnrect``) may keep its ``Config`` in ``settings.py`` there,
    importing nothing but pydantic and typing. None when there is no such file (or it fails to load:
    the full check after the import reports that).
    """
    import importlib.util

    if "." in target or ":" in target:
        return None
    try:
        spec = importlib.util.find_spec(target)  # a top-level name: the package is found, not run
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "settings.py" if locations else None
    if path is None or not path.is_file():
        return None
    loaded = importlib.util.spec_from_file_location(f"_normlab_settings_{target}", path)
    module = importlib.util.module_from_spec(loaded)
    sys.modules[loaded.name] = module  # pydantic resolves the annotations through the module's entry
    try:
        loaded.loader.exec_module(module)
    except Exception:
        del sys.modules[loaded.name]
        return None
    return getattr(module, "Config", None)


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is now (a captured or replaced stream, not the one at creation)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _rank() -> str:
    """"rank R: " in a process of a distributed run (torchrun sets RANK and WORLD_SIZE), else ""."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""


def _check_launch(args) -> None:
    """What ``--nproc N`` can refuse before starting N processes (exit 2 here, not 1 from torchrun)."""
    from .runner import _load_config, _new_run_dir, check_processes

    cfg, source = _load_config(args.file, args.overrides)
    check_processes(cfg, source, args.nproc)
    if args.out is None:
        raise UsageError("--nproc: needs --out DIR (every process must name the same run directory)")
    _new_run_dir(args.out, source, args.resume)


def _torchrun(nproc: int, argv: list[str]) -> int:
    """``normlab run --nproc N ...`` as ``torchrun --standalone --nproc_per_node N -m normlab.cli run ...``: its
    exit status (1 when any process failed; torchrun names the rank)."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "normlab.cli", *rest]
    return subprocess.call(cmd)


def _blame_override(message: str, flags: list[tuple[str, str]]) -> str:
    """A refused setting that a ``--set`` (or ``--grid``) gave is named by that flag, not by the run file it
    was applied to: ``FILE: data.batch_size: ...`` becomes ``--set data.batch_size=big: data.batch_size: ...``.

    The flag's key is blamed where the refused key lies at or under it, or where the refused key is above it
    and the message is about what the flag added (an unknown key, or the name of the flag's next segment:
    ``--set plugins.noize={}`` for ``FILE: plugins: unknown plugin 'noize'``)."""
    import re

    from .config import _cut

    found = re.match(r"([^:]+): ([^:\s]+): (.*)", message)
    if found is None:
        return message
    where, rest = found.group(2), found.group(3)
    above = where.split(".")
    for flag, item in reversed(flags):
        key = item.split("=", 1)[0].strip()
        if not key:
            continue
        parts = key.split(".")
        if re.fullmatch(rf"{re.escape(key)}(?:[.\[].*)?", where) or (
                len(above) < len(parts) and parts[:len(above)] == above
                and (rest.startswith("unknown key") or re.search(rf"\b{re.escape(parts[len(above)])}\b", rest))):
            return f"{flag} {_cut(item)}: " + message.split(": ", 1)[1]
    return message


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = logging.getLogger("normlab")  # our messages only, not every library's INFO lines
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("normlab: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        if args.command == "plugins":
            return _plugins(args.json, args.name, args.check)
        if args.command == "new-plugin":
            from .template import new_plugin

            print(f"wrote {new_plugin(args.name, Path(args.dir))}")
            return EXIT_OK
        if args.command == "show":
            return _show(args.run_dir, args.all)
        if args.command == "compare":
            return _compare(args.run_dirs, args.keys, args.plot, args.cost)
        if args.command == "launch":
            from .launch import from_args

            return from_args(args)
        if args.command == "run":
            precheck(args.file, args.overrides)  # before torch is imported: bad input is refused in well under 1 s
            if args.nproc < 1:
                raise UsageError(f"--nproc: expected at least 1 process, got {args.nproc}")
            if args.nproc > 1 and "RANK" not in os.environ:
                _check_launch(args)
                return _torchrun(args.nproc, argv if argv is not None else sys.argv[1:])
        from . import runner

        quiet = True if args.quiet else None
        if args.command == "run":
            result = runner.run(args.file, out=args.out, overrides=args.overrides, resume=args.resume, quiet=quiet)
        else:
            result = runner.evaluate(args.run_dir, overrides=args.overrides, quiet=quiet, name=args.name)
        if os.environ.get("RANK", "0") != "0":  # another process of a distributed run: rank 0 reports
            return EXIT_OK
        if isinstance(result, runner.GroupResult):
            print(group_table(result.summary, everything=False))
            print(f"\nseed group: {result.dir} (runs: {', '.join(p.name for p in result.runs.values())})")
            return EXIT_OK
        print(results_table(json.loads((result.dir / "results.json").read_text()), everything=False))
        print(f"\nrun directory: {result.dir}")
        return EXIT_OK
    except UsageError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:  # raised in a data-loader worker: torch prefixes its traceback
            message = message.rstrip().splitlines()[-1].split("UsageError: ", 1)[-1]
        flags = [("--set", o) for o in getattr(args, "overrides", None) or []]
        flags += [("--grid", g) for g in getattr(args, "grid", None) or []]
        print(f"normlab: {_rank()}error: {_blame_override(message, flags)}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailure as e:
        print(f"normlab: {_rank()}run failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("normlab: interrupted; continue with --resume", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception:
        traceback.print_exc()
        if _rank():
            print(f"normlab: {_rank()}run failed (traceback above)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
