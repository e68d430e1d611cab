"""Atomic per-epoch checkpoints: safetensors for tensors, JSON for everything else.

Layout under ``RUN_DIR/checkpoints``::

    epoch-0003/model.safetensors       model state (plugin buffers included)
    epoch-0003/optimizer.safetensors   optimizer tensors (momentum, Adam moments)
    epoch-0003/state.json              epoch, optimizer param groups, scheduler, RNG states, history
    last.json                          {"dir": "epoch-0003", "epoch": 3}

A checkpoint directory is written under a temporary name and renamed into
place; ``last.json`` is replaced atomically after it, and older epochs are then
removed. A run killed at any point therefore leaves a complete last checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UsageError
from .results import write_json_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "latest_model_file", "rng_state",
           "set_rng_state"]


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states, JSON-serialisable."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, inner, gauss = state["python"]
    random.setstate((v, tuple(inner), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store independent copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _split_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, epoch: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    extra: dict | None = None) -> Path:
    """Write the checkpoint of a finished epoch atomically; return its directory."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"epoch-{epoch:04d}"
    remove_partial(run_dir)  # folders a kill or a full disk left half-written
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".epoch-{epoch:04d}."))
    save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"))
    state: dict[str, Any] = {"epoch": epoch, "rng": rng_state(), **(extra or {})}
    if optimizer is not None:
        tensors, meta = _split_optimizer(optimizer)
        save_file(_contiguous(tensors), str(tmp / "optimizer.safetensors"))
        state["optimizer"] = meta
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    write_json_atomic(tmp / "state.json", state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(ckpt_root / "last.json", {"dir": final.name, "epoch": epoch})
    for old in ckpt_root.glob("epoch-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete the temporary ``.epoch-*`` folders of checkpoints that were never completed; return them."""
    gone = sorted((Path(run_dir) / "checkpoints").glob(".epoch-*"))
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def last_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "last.json"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
        if not isinstance(name, str) or not name.startswith("epoch-") or "/" in name or "\\" in name:
            raise TypeError(name)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UsageError(f"{pointer}: not a normlab checkpoint pointer (expected {{\"dir\": \"epoch-NNNN\", "
                         f"\"epoch\": N}})") from None
    path = pointer.parent / name
    return path if (path / "model.safetensors").is_file() else None


def latest_model_file(run_dir: Path) -> Path | None:
    ckpt = last_checkpoint(run_dir)
    return ckpt / "model.safetensors" if ckpt else None


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer=None, scheduler=None,
                    built_from: str = "run.yaml") -> dict:
    """Restore model, optimizer, scheduler and RNG from the last checkpoint; return its state.json.

    Every problem is a UsageError of one line naming the file that is bad: a state.json that is not
    the expected object, model weights whose tensor names or shapes do not fit the model built from
    run.yaml (``built_from`` names what built it: run.yaml and any overrides), an unreadable (truncated)
    safetensors file.
    """
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        raise UsageError(f"{run_dir}: no trained weights (checkpoints/last.json is missing: the run stopped before "
                         f"its first epoch ended)")
    state = _read_state(ckpt / "state.json")
    weights = _read_tensors(ckpt / "model.safetensors")
    problem = state_dict_mismatch(model.state_dict(), weights)
    if problem:
        raise UsageError(f"{ckpt}/model.safetensors: does not fit the model built from {built_from}: {problem}")
    model.load_state_dict(weights, strict=True)
    if optimizer is not None and "optimizer" in state:
        tensors = _read_tensors(ckpt / "optimizer.safetensors")
        try:
            optimizer.load_state_dict(_join_optimizer(tensors, state["optimizer"]))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UsageError(f"{ckpt}/optimizer.safetensors: does not fit the optimizer of run.yaml "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    try:
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise UsageError(f"{ckpt}/state.json: wrong scheduler or RNG state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})") from None
    return state


def state_dict_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """Which tensors of ``state`` do not fit ``own`` (names and shapes, a few of each); None when all fit."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and own[k].shape != state[k].shape]
    parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
             for label, keys in (("missing", missing), ("unexpected", unexpected),
                                 ("of the wrong shape, saved vs model", shapes)) if keys]
    return "; ".join(parts) or None


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int) or not isinstance(state.get("rng"), dict):
        raise UsageError(f"{path}: expected an object with an integer `epoch` and an `rng` mapping")
    return state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise UsageError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); the file is "
                         f"truncated or corrupt") from None
