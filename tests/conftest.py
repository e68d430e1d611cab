import copy
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # plugins_for_tests

if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per worker (and its subprocesses): no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny forwards: no OpenMP spin-waiting on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# timm's own model for tests: a ResNet (a deep 3x3 stem, layer1..layer4 of one block each, BasicBlocks and a
# Bottleneck in layer3, 32-192 channels, 15 BNs, 374k parameters): a training step of 64 images at 16 px takes
# 15 ms against resnet18's 131 ms (one thread), its checkpoints are 30x smaller. Tests of the host's bookkeeping
# use it; tests of a method on the architecture its paper used, and of resnet18's own numbers, name their model.
TINY_MODEL = "test_resnet"


@pytest.fixture
def tiny_config():
    """A run that trains TINY_MODEL for a few steps on a slice of the embedded data at 16x16 (under a second on
    a fast CPU once imports are done; the tests that use it check the host's bookkeeping, not accuracy)."""
    return {
        "seed": 1,
        "model": {"name": TINY_MODEL},
        "data": {"name": "mnist", "batch_size": 64, "n_train": 256, "image_size": 16},
        "train": {"val_examples": 100, "epochs": 2, "lr": 0.05, "warmup_epochs": 0.5},
        "evaluate": {"clean": {"n_examples": 200}},
    }


SMALL_TRAINED = {"seed": 0, "model": {"name": TINY_MODEL}, "data": {"n_train": 1024, "batch_size": 64},
                 "train": {"val_examples": 100, "epochs": 3, "lr": 0.1},
                 "evaluate": {"clean": {"n_examples": 200}}}


def made_once(tmp_path_factory, name: str, make) -> Path:
    """``make(directory)`` once for the whole test session, however many xdist workers ask: the first makes it
    under a file lock in the directory the workers share, the others wait for it and get the same directory."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-of-USER/pytest-N/, above each worker's popen-gwK/
    out, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            make(out)
            done.write_text("")
    return out


@pytest.fixture(scope="session")
def small_trained(tmp_path_factory):
    """TINY_MODEL trained 3 epochs on 1,024 digits at 32 px (SMALL_TRAINED: clean accuracy 0.91), shared by the
    tests that need a model that learned something: its run directory (``.dir``) and metrics (``.metrics``),
    made once for all workers.
    Read-only: a test that evaluates into a run directory copies it first (:func:`copy_run`)."""
    import json
    import types

    import normlab

    run_dir = made_once(tmp_path_factory, "small_trained", lambda d: normlab.run(SMALL_TRAINED, out=d, quiet=True))
    return types.SimpleNamespace(dir=run_dir, metrics=json.loads((run_dir / "results.json").read_text())["metrics"])


def copy_run(result, dest):
    """A copy of a run directory to evaluate into, leaving the shared one as it was."""
    import shutil

    return Path(shutil.copytree(result.dir, dest))


@pytest.fixture
def write_yaml(tmp_path):
    import yaml

    def write(data, name="run.yaml"):
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch):
    monkeypatch.delenv("NORMLAB_LOAD_PLUGINS", raising=False)


def input_batch_stats(model, x):
    """Per-BN mean and unbiased variance of each BN's input, from forward hooks on a train-mode copy."""
    import torch
    from torch import nn

    ref = copy.deepcopy(model).train()
    stats = {}

    def hook(name):
        def fn(mod, inputs, out):
            f = inputs[0].transpose(0, 1).flatten(1)
            stats[name] = (f.mean(1), f.var(1, unbiased=True))
        return fn

    for n, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(hook(n))
    with torch.no_grad():
        ref(x)
    return stats


def subprocess_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env
