"""A run directory's ``results.json`` and ``correct.safetensors`` (no torch: ``normlab show`` and ``compare``
import only this)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

from .errors import UsageError

__all__ = ["read_results", "write_outcomes", "read_outcomes", "OUTCOMES", "write_atomic", "write_json_atomic",
           "write_text_atomic", "unwritable_folder", "unmakeable_dir"]

MAX_RESULTS_BYTES = 64 << 20


def write_atomic(path: str | Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then ``os.replace`` it there: readers see the
    old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def unwritable_folder(path: Path) -> Path | None:
    """The nearest existing path at or above ``path``, when files cannot be made below it there (not a
    directory, or not writable); None when they can. For refusing an output path before any work."""
    there = next((p for p in [path, *path.parents] if os.path.exists(p)), Path("."))
    return None if there.is_dir() and os.access(there, os.W_OK | os.X_OK) else there


def unmakeable_dir(path: Path) -> str | None:
    """Why an output directory ``path`` can be neither used nor made (a phrase for ``--out PATH: ...``), or
    None when it can: a file of that name, a folder above it that takes no files, or what the system
    answers when the directory is made (and at once removed again, with any folders made for it): a name
    too long, a file system such as /proc. For refusing ``--out`` before any work; nothing is left behind."""
    if os.path.isdir(path):
        return None if os.access(path, os.W_OK | os.X_OK) else f"cannot write there ({path} is not writable)"
    if os.path.lexists(path):
        return "expected a directory; a file of that name exists"
    there = unwritable_folder(path)
    if there is not None:
        return f"cannot write there ({there} is not a writable directory)"
    made = [p for p in [path, *path.parents] if not os.path.lexists(p)]  # deepest first
    try:
        path.mkdir(parents=True)
    except OSError as e:
        return f"cannot make that directory ({e.strerror or type(e).__name__})"
    finally:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
    return None


def write_json_atomic(path: str | Path, data) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
    write_atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def is_number(value) -> bool:
    """Whether ``value`` is a finite int or float (not a bool): what a metric, a timing or a cost holds."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: Path, what: str):
    """A normlab JSON file, bounded in size; one line naming the file when it is not JSON."""
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise UsageError(f"{path}: larger than {MAX_RESULTS_BYTES} bytes; not a normlab {what} file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except RecursionError:
        raise UsageError(f"{path}: not a normlab {what} file (nested too deeply)") from None


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
    results = read_json(path, "results")
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise UsageError(f"{path}: expected an object with a `metrics` mapping")
    for section in ("records", "timing", "plugins", "cost"):
        if not isinstance(results.get(section, {}), dict):
            raise UsageError(f"{path}: {section}: expected a mapping")
    for section in ("metrics", "timing", "cost"):  # read back as numbers by `show`, `compare` (--cost)
        for key, value in results.get(section, {}).items():
            if not is_number(value):
                raise UsageError(f"{path}: {section}.{key}: expected a finite number, got {str(value)[:60]!r}")
    return results


OUTCOMES = "correct.safetensors"


def write_outcomes(run_dir: str | Path, outcomes: dict) -> None:
    """Merge per-example outcomes (:class:`normlab.evals.Outcome`) into ``RUN_DIR/correct.safetensors``.

    One uint8 tensor of packed bits per accuracy measured on examples (the example order is the
    evaluation order); averages store only the keys they average. The metadata entry ``normlab`` is a
    JSON object: key -> ``{"n", "examples"}`` or ``{"of", "examples"}``.
    """
    if not outcomes:
        return
    import numpy as np
    from safetensors.numpy import save_file

    from .stats import pack

    index, tensors = _read_index(run_dir, required=False)
    for key, o in outcomes.items():
        if o.binary:
            tensors[key] = pack(np.asarray(o.scores) > 0.5)
            index[key] = {"n": int(np.asarray(o.scores).size), "examples": o.examples}
        else:
            tensors.pop(key, None)
            index[key] = {"of": list(o.of), "examples": o.examples}
    write_atomic(Path(run_dir) / OUTCOMES, lambda tmp: save_file(tensors, tmp, metadata={"normlab": json.dumps(index)}))


def _read_index(run_dir: str | Path, required: bool = True) -> tuple[dict, dict]:
    path = Path(run_dir) / OUTCOMES
    if not path.is_file():
        if required:
            raise UsageError(f"{run_dir}: no {OUTCOMES} (per-example results are stored by normlab 0.1 runs "
                             f"evaluated after this file was introduced: run `normlab eval {run_dir}`)")
        return {}, {}
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise UsageError(f"{path}: larger than {MAX_RESULTS_BYTES} bytes; not a normlab outcomes file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            index = json.loads((f.metadata() or {}).get("normlab", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise UsageError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(index, dict):
        raise UsageError(f"{path}: metadata `normlab`: expected a mapping of keys")
    for key, entry in index.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("examples"), str) and (
            (isinstance(entry.get("n"), int) and key in tensors and tensors[key].size * 8 >= entry["n"] > 0)
            or (isinstance(entry.get("of"), list) and all(k in index for k in entry["of"]) and entry["of"]))
        if not ok:
            raise UsageError(f"{path}: {key}: expected packed bits with their count, or the keys averaged")
    return index, tensors


def read_outcomes(run_dir: str | Path) -> dict[str, tuple]:
    """key -> (per-example scores as a float array, examples id, binary, parts) for every stored accuracy:
    ``binary`` for one measured on examples; ``parts`` what an average averages, as ((key, its parts), ...),
    () for a measured one."""
    import numpy as np

    from .stats import unpack

    index, tensors = _read_index(run_dir)
    out: dict[str, tuple] = {}

    def scores(key: str, depth: int = 0):
        if key not in out:
            entry = index[key]
            if "n" in entry:
                out[key] = (unpack(tensors[key], entry["n"]).astype(np.float64), entry["examples"], True, ())
            else:
                if depth > 8:
                    raise UsageError(f"{Path(run_dir) / OUTCOMES}: {key}: averages nested too deep")
                parts = [scores(k, depth + 1) for k in entry["of"]]
                if len({p[0].size for p in parts}) != 1:
                    raise UsageError(f"{Path(run_dir) / OUTCOMES}: {key}: its parts differ in length")
                out[key] = (np.mean([p[0] for p in parts], axis=0), entry["examples"], False,
                            tuple((k, p[3]) for k, p in zip(entry["of"], parts)))
        return out[key]

    for key in index:
        scores(key)
    return out
