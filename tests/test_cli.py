"""Bad input exits 2 with one line naming the file, key and expectation, and writes nothing."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import subprocess_env
from normlab.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


BAD = {
    "unknown plugin": ("plugins: {advnb: {}}", r"run.yaml: plugins: unknown plugin 'advnb' \(did you mean 'advbn'\?\)"),
    "plugin not installed": ("plugins: [future]", r"plugins: plugin 'future' is not installed; install it with: pip install normlab-future"),
    "misspelled key": ("train: {epoch: 3}", r"run.yaml: train.epoch: unknown key \(did you mean 'epochs'\?\)"),
    "misspelled nested optional key": ("model: {robustbench: {name: Standard, datset: cifar10}}",
                                       r"run.yaml: model.robustbench.datset: unknown key \(did you mean 'dataset'\?\)"),
    "misspelled top key": ("trian: {epochs: 3}", r"run.yaml: trian: unknown key \(did you mean 'train'\?\)"),
    "wrong type": ("train: {lr: fast}", r"run.yaml: train.lr: Input should be a valid number.*\(got 'fast'\)"),
    "negative epochs": ("train: {epochs: -1}", r"run.yaml: train.epochs: Input should be greater than or equal to 0 \(got -1\)"),
    "missing data path": ("data: {name: imagefolder, root: /nonexistent/imagenet}", r"run.yaml: data.root: directory '/nonexistent/imagenet' does not exist"),
    "yaml python tag": ("seed: !!python/object/apply:os.system ['echo pwned']", r"run.yaml: invalid YAML at line 1"),
    "bad dataset": ("data: {name: svhn}", r"run.yaml: data.name: Input should be 'mnist', 'cifar10', 'cifar100' or 'imagefolder'"),
    "unknown model": ("model: {name: resnet81}", r"run.yaml: model.name: unknown timm model 'resnet81' \(did you mean"),
    "unknown evaluator": ("evaluate: {claen: {}}", r"run.yaml: evaluate.claen: unknown evaluator \(did you mean 'clean'\?\)"),
    "bad evaluator setting": ("evaluate: {clean: {n_examples: 0}}", r"run.yaml: evaluate.clean.n_examples: Input should be greater than or equal to 1"),
    "bad plugin setting": ("plugins: {noise: {sigma: -1}}", r"run.yaml: plugins.noise.sigma: Input should be greater than or equal to 0"),
    "missing checkpoint": ("model: {checkpoint: /nonexistent/w.safetensors}", r"run.yaml: model.checkpoint: no such file"),
    "bad trainable prefix": ("model: {trainable: [layer9]}", r"run.yaml: model.trainable: no parameter name starts with 'layer9'"),
    "not a mapping": ("- 1\n- 2", r"run.yaml: expected a mapping of settings at the top level"),
    # values that validated but could not run (issue 16): refused before anything is built
    "non-finite lr": ("train: {lr: .nan}", r"run.yaml: train.lr: Input should be a finite number"),
    "infinite weight decay": ("train: {weight_decay: .inf}", r"run.yaml: train.weight_decay: Input should be a finite number"),
    "absurd epochs": ("train: {epochs: 1000000000}", r"run.yaml: train.epochs: Input should be less than or equal to 100000"),
    "seed beyond numpy": ("seed: 4294967296", r"run.yaml: seed: Input should be less than or equal to 4294967295"),
    "zero std": ("data: {std: [0.3, 0, 0.3]}", r"run.yaml: data.std: every channel's std must be greater than 0 \(got \[0.3, 0.0, 0.3\]\)"),
    "infinite plugin setting": ("plugins: {advbn: {step_size: .inf}}",
                                r"run.yaml: plugins.advbn.step_size: expected a finite number \(got inf\)"),
    "infinite plugin setting (augmix)": ("plugins: {augmix: {alpha: .inf}}",
                                         r"run.yaml: plugins.augmix.alpha: expected a finite number \(got inf\)"),
    "bnrect asks more samples than a domain offers": (
        "adapt_samples: 16\nplugins: {bnrect: {n_samples: 32}}",
        r"run.yaml: plugins.bnrect.n_samples: expected at most adapt_samples \(16\).*got 32"),
    "eot with an L2 pgd": ("evaluate: {pgd: {norm: L2, eot: 4}}",
                           r"run.yaml: evaluate.pgd: .*eot > 1 needs norm 'Linf'"),
    "an unknown adapt mode": ("evaluate: {fgsm: {adapt: always}}",
                              r"run.yaml: evaluate.fgsm.adapt: Input should be 'static', 'adaptive' or 'both'"),
    "cifar stem on a vision transformer": ("model: {name: vit_tiny_patch16_224, stem: cifar, kwargs: {img_size: 32}}",
                                           r"run.yaml: model.stem: 'cifar' is defined for timm ResNet.*VisionTransformer"),
    "drop rate above 1": ("model: {kwargs: {drop_rate: 1.5}}",
                          r"run.yaml: model.kwargs: drop_rate is a probability: expected a number in \[0, 1\), got 1.5"),
    "kwargs the model rejects": ("model: {kwargs: {colour: 3}}", r"run.yaml: model.kwargs: .*colour"),
    "n_train below batch_size": ("data: {n_train: 32, batch_size: 128}",
                                 r"run.yaml: \(top level\): data.n_train \(32\) is smaller than data.batch_size \(128\)"),
    # found by fuzzing (2026-12-04): tracebacks, or refusals only after training
    "a NUL byte": ("model: {name: res\0net18}", r"run.yaml: invalid YAML: unacceptable character #x0000"),
    "absurd threads": ("train: {threads: 100000000000}", r"run.yaml: train.threads: Input should be less than or equal to 4096"),
    "no trainable prefix": ("model: {trainable: []}", r"run.yaml: model.trainable: List should have at least 1 item"),
    "bnrect layers that name no BN": ("plugins: {bnrect: {layers: [nosuchlayer]}}",
                                      r"run.yaml: plugins.bnrect.layers: expected prefixes of the backbone's BN layer "
                                      r"names.*no BN layer starts with 'nosuchlayer'"),
    "unknown style domain": ("evaluate: {style: {domains: [sketch]}}",
                             r"run.yaml: evaluate.style.domains: unknown domain 'sketch'; generated domains are"),
    "missing style folder": ("evaluate: {style: {folders: {sketch: /nonexistent/sketch}}}",
                             r"run.yaml: evaluate.style.folders: sketch: directory '/nonexistent/sketch' does not exist"),
    "an ImageFolder without class folders": ("data: {name: imagefolder, root: EMPTY_TREE}",
                                             r"run.yaml: data.root: expected an ImageFolder tree with .*Couldn't find "
                                             r"any class folder"),
    "milestones without the step schedule": ("train: {milestones: [2]}",
                                             r"run.yaml: train.milestones: only schedule 'step' uses milestones "
                                             r"\(schedule is 'cosine'\)"),
    "a negative milestone": ("train: {schedule: step, milestones: [-1]}",
                             r"run.yaml: train.milestones.0: Input should be greater than or equal to 1"),
    "unknown divergence domain": ("evaluate: {divergence: {domains: [sketch]}}",
                                  r"run.yaml: evaluate.divergence.domains: unknown domain 'sketch'"),
    # refused after training before (2026-12-06): the layers need the built model, the folders exist or not
    "divergence layers the backbone lacks": ("evaluate: {divergence: {layers: [layer1, layer9]}}",
                                             r"run.yaml: evaluate.divergence.layers: the backbone has no layer "
                                             r"'layer9' \(its top-level layers: conv1, bn1, act1, maxpool, layer1"),
    "a corruption cache under a file": ("evaluate: {corruptions: {cache_dir: A_FILE/cache}}",
                                        r"run.yaml: evaluate.corruptions.cache_dir: the generated sets are written "
                                        r"and locked under .*a-file/cache, but .*a-file is not a writable directory"),
    "a missing released-corruptions folder": (
        "evaluate: {corruptions: {source: robustbench, data_dir: /nonexistent/c}}",
        r"run.yaml: evaluate.corruptions.data_dir: expected an existing directory \(got '/nonexistent/c'\)"),
    "a sweep's divergence layers the backbone lacks": (
        "plugins: {bnrect: {}}\nevaluate: {sweep: {knob: plugins.bnrect.n_samples, values: [8], "
        "evaluators: {divergence: {layers: [layer9]}}}}",
        r"run.yaml: evaluate.sweep.evaluators.divergence.layers: the backbone has no layer 'layer9'"),
    "a sweep's released corruptions for data without them": (
        "evaluate: {sweep: {knob: plugins.bnrect.n_samples, values: [8], evaluators: {corruptions: "
        "{source: robustbench}}}}\nplugins: {bnrect: {}}",
        r"run.yaml: evaluate.sweep.evaluators.corruptions.source: robustbench has no corruption set for data "
        r"'mnist'"),
    "a missing robustbench data_dir": ("evaluate: {robustbench: {data_dir: /nonexistent/rb}}",
                                       r"run.yaml: evaluate.robustbench.data_dir: expected an existing directory"),
    # a model that cannot take the run's images: refused by one forward at build (was: the first step failed,
    # after the run directory was written)
    "in_chans that is not the data's channels": (
        "model: {kwargs: {in_chans: 1}}", r"run.yaml: model.name: 'resnet18' cannot take this run's 3x32x32 images "
                                          r"\(data.image_size, .*expected input\[2, 3, 32, 32\] to have 1 channels"),
    "a ViT at another image size": (
        "model: {name: vit_tiny_patch16_224}\ndata: {image_size: 32}",
        r"run.yaml: model.name: 'vit_tiny_patch16_224' cannot take this run's 3x32x32 images .*Input height \(32\) "
        r"doesn't match model \(224\)"),
}


FUTURE = "normlab_registry.CATALOGUE['future'] = normlab_registry.Entry('future', 'normlab-future', 'not released')"
"""A catalogued plugin that no environment has installed (every published one is installed here)."""


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_run_file_exits_2_with_one_line_and_no_run_dir(case, tmp_path, write_yaml, capsys, monkeypatch):
    import normlab_registry

    monkeypatch.setitem(normlab_registry.CATALOGUE, "future", normlab_registry.Entry("future", "normlab-future", ""))
    text, pattern = BAD[case]
    if "EMPTY_TREE" in text:  # train/ and val/ exist, with no class folders in them
        for split in ("train", "val"):
            (tmp_path / "tree" / split).mkdir(parents=True)
        text = text.replace("EMPTY_TREE", str(tmp_path / "tree"))
    if "A_FILE" in text:
        (tmp_path / "a-file").write_text("")
        text = text.replace("A_FILE", str(tmp_path / "a-file"))
    path = write_yaml(text)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["run", path, "--out", out_dir], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not out_dir.exists()
    assert "Traceback" not in err


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(7))
HOSTILE = {  # bytes of a run file -> the one line expected (issue 16: bad input that crashed or was accepted)
    "not utf-8": (b"seed: 0\nmodel: {name: \xff\xfe}\n", r"run.yaml: not UTF-8 text \(byte 0xff on line 2\)"),
    "nested in a mapping": (b"seed: " + b"{a: " * 3000 + b"1" + b"}" * 3000, r"invalid YAML: nested deeper than 64"),
    "nested in a list": (b"evaluate: {sweep: {knob: lam, values: " + b"[" * 5000 + b"]" * 5000 + b"}}",
                         r"invalid YAML: nested deeper than 64 levels at line 1"),
    "alias bomb in a sweep's values": ((BOMB + "evaluate: {sweep: {knob: lam, values: *h}}\n").encode(),
                                       r"run.yaml: more than 100000 values once YAML aliases are expanded"),
    "duplicate top key": (b"seed: 0\ntrain: {epochs: 1}\nseed: 1\n", r"run.yaml: invalid YAML.*duplicate key 'seed' at line 3"),
    "duplicate nested key": (b"train: {lr: 0.1, lr: 0.2}", r"duplicate key 'lr' at line 1"),
    "plugin named twice in a mapping": (b"plugins:\n  noise: {}\n  noise: {sigma: 0.2}\n", r"duplicate key 'noise' at line 3"),
    "plugin named twice in a list": (b"plugins: [noise, noise]", r"run.yaml: plugins: .*'noise' is named twice"),
    "evaluator named twice in a list": (b"evaluate: [clean, clean]", r"run.yaml: evaluate: .*'clean' is named twice"),
    "empty": (b"", r"run.yaml: the run file is empty; it needs at least one setting"),
    "comments only": (b"# a run file\n\n# nothing here\n", r"run.yaml: the run file is empty"),
    "too large": (b"seed: 0\n" + b"# padding\n" * 120_000, r"run.yaml: larger than 1048576 bytes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_run_file_exits_2_with_one_short_line_and_no_run_dir(case, tmp_path, capsys):
    data, pattern = HOSTILE[case]
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    code, _, err = run_cli(["run", path, "--out", tmp_path / "out"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert len(lines[0]) < 300 + len(str(path)) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("item, pattern", [
    ("evaluate.sweep.values=" + "[" * 5000 + "]" * 5000, r"--set evaluate\.sweep\.values=\[\[\[.*\.\.\.: invalid YAML: nested deeper than 64"),
    ("evaluate.sweep.values={" + BOMB.strip().replace("\n", ", ") + "}", r"--set evaluate\.sweep\.values=.*: more than 100000 values"),
    ("seed=" + "x" * 100_000,
     r"--set seed=xxxx.*\.\.\.: seed: Input should be a valid integer.*\(got 'xxxx.*\.\.\.\)$"),
])
def test_hostile_set_values_exit_2_with_one_short_line(item, pattern, tmp_path, write_yaml, capsys):
    path = write_yaml("seed: 0")
    code, _, err = run_cli(["run", path, "--out", tmp_path / "o", "--set", item], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert len(lines[0]) < 400, lines[0][:400]
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_or_not_writable_exits_2(tmp_path, write_yaml, capsys, monkeypatch):
    path = write_yaml("seed: 0")
    afile = tmp_path / "results.txt"
    afile.write_text("keep me")
    code, _, err = run_cli(["run", path, "--out", afile], capsys)
    assert code == 2 and re.search(r"--out .*results.txt: expected a directory; a file of that name exists", err)
    code, _, err = run_cli(["run", path, "--out", afile / "run"], capsys)
    assert code == 2 and "is not a writable directory" in err and afile.read_text() == "keep me"
    # what only making the directory tells: a name too long for the file system, /proc (no folders there)
    for out, why in ((tmp_path / "a" / ("x" * 300), "File name too long"), (Path("/proc/normlab-run"), "")):
        code, _, err = run_cli(["run", path, "--out", out], capsys)
        assert code == 2 and f"--out {out}: cannot" in err and why in err and len(err.strip().splitlines()) == 1
        assert not os.path.lexists(out) and not (tmp_path / "a").exists()  # the folders tried are gone again
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: the host asks os.access, so answer as for a user
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked) else real(p, mode, **kw))
        code, _, err = run_cli(["run", path, "--out", locked / "run"], capsys)
        assert code == 2 and f"{locked} is not a writable directory" in err
    finally:
        locked.chmod(0o700)


def test_yaml_python_tag_is_not_executed(tmp_path, write_yaml, capsys):
    marker = tmp_path / "pwned"
    path = write_yaml(f"seed: !!python/object/apply:os.system ['touch {marker}']")
    code, _, _ = run_cli(["run", path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and not marker.exists()


def test_bad_overrides(tmp_path, write_yaml, capsys):
    path = write_yaml("seed: 0")
    code, _, err = run_cli(["run", path, "--out", tmp_path / "o", "--set", "train.epochs"], capsys)
    assert code == 2 and "--set train.epochs: expected dotted.key=value" in err
    code, _, err = run_cli(["run", path, "--out", tmp_path / "o", "--set", "train.epochs=-3"], capsys)
    assert code == 2 and "train.epochs: Input should be greater than or equal to 0" in err
    code, _, err = run_cli(["run", path, "--out", tmp_path / "o", "--set", "seed.x=1"], capsys)
    assert code == 2 and "seed is not a mapping" in err
    # a refused key the flag added is named by the flag, not by the run file it was applied to
    for item, said in (("trian.lr=1", "--set trian.lr=1: trian: unknown key"),
                       ("plugins.noize={}", "--set plugins.noize={}: plugins: unknown plugin 'noize'"),
                       ("model.kwargs.bogus=1", "--set model.kwargs.bogus=1: model.kwargs: "),
                       ("train.lr=-1", "--set train.lr=-1: train.lr: ")):
        code, _, err = run_cli(["run", path, "--out", tmp_path / "o", "--set", "train.epochs=1", "--set", item], capsys)
        assert code == 2 and err.startswith(f"normlab: error: {said}"), (item, err)
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(["run", tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{tmp_path}: expected a run file (YAML), got a directory" in err
    # ... and a problem of the run file itself still names the file, beside an unrelated flag
    bad = write_yaml("seed: 0\ntrian: {lr: 1}\n")
    code, _, err = run_cli(["run", bad, "--out", tmp_path / "o", "--set", "train.lr=1"], capsys)
    assert code == 2 and f"{bad}: trian: unknown key" in err


def test_existing_out_dir_is_refused(tmp_path, write_yaml, capsys):
    path = write_yaml("seed: 0")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    code, _, err = run_cli(["run", path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "exists and is not empty" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("offline_env", [False, True])
def test_offline_pretrained_is_a_clear_error_at_once(tmp_path, write_yaml, capsys, monkeypatch, offline_env):
    """No network: one line, exit 2, no run directory, and no minute of huggingface_hub's retries (22 lines):
    an unreachable Hub puts the hub in offline mode for the call (HF_HUB_OFFLINE set by the user: the same)."""
    import socket

    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_env)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    path = write_yaml("model: {name: resnet18, pretrained: true}")
    code, _, err = run_cli(["run", path, "--out", tmp_path / "o"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err  # the retries logged a line each
    assert "model.pretrained: timm's pretrained weights for 'resnet18' are not available" in lines[0]
    assert not (tmp_path / "o").exists() and constants.HF_HUB_OFFLINE is offline_env  # restored


def test_hub_reachability_probe_on_loopback():
    import socket

    from normlab.adapters.hub import reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert reachable(f"http://127.0.0.1:{port}")
    assert not reachable(f"http://127.0.0.1:{port}", timeout=1.0)  # closed now: refused


def test_show_and_eval_on_missing_run(tmp_path, capsys):
    code, _, err = run_cli(["show", tmp_path], capsys)
    assert code == 2 and "no results.json" in err
    code, _, err = run_cli(["eval", tmp_path], capsys)
    assert code == 2 and "not a normlab run directory" in err


def test_real_process_exit_status_and_single_line(tmp_path, write_yaml):
    path = write_yaml("train: {epochs: -1}")
    proc = subprocess.run([sys.executable, "-m", "normlab.cli", "run", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"normlab: error: {path}: train.epochs: Input should be greater than or equal to 0 (got -1)"]


def test_plugins_json_lists_installed_plugins_with_version_and_hooks(capsys):
    code, out, _ = run_cli(["plugins", "--json"], capsys)
    assert code == 0
    listing = {p["name"]: p for p in json.loads(out)}
    assert listing["noise"]["version"] == "0.1.0"
    assert listing["noise"]["distribution"] == "normlab-noise"
    assert listing["noise"]["hooks"] == ["on_batch"]
    assert listing["noise"]["error"] is None


def test_show_hides_per_severity_and_per_layer_keys_under_any_prefix():
    from normlab.cli import _detail

    for key in ("corruptions/fog/3/acc", "bnrect/corruptions/fog/3/acc", "routes/sweep/route=aux/corruptions/fog/1/acc",
                "divergence/invert/layer1", "n8/divergence/invert/layer1"):
        assert _detail(key), key
    for key in ("corruptions/acc", "corruptions/fog/acc", "bnrect/corruptions/acc", "divergence/invert/mean",
                "sweep/lam=0.5/clean/acc", "clean/acc"):
        assert not _detail(key), key


def test_load_plugins_env_var(capsys, monkeypatch):
    monkeypatch.setenv("NORMLAB_LOAD_PLUGINS", "")
    code, out, _ = run_cli(["plugins", "--json"], capsys)
    assert code == 0 and json.loads(out) == []
    code, out, _ = run_cli(["plugins", "--check"], capsys)
    assert code == 0 and out.strip() == "no plugins loaded (NORMLAB_LOAD_PLUGINS='')"  # not "none installed"
    code, out, _ = run_cli(["plugins"], capsys)  # the listing from metadata says the same
    assert code == 0 and out.strip() == "no plugins loaded (NORMLAB_LOAD_PLUGINS='')"
    monkeypatch.setenv("NORMLAB_LOAD_PLUGINS", "noise")
    code, out, _ = run_cli(["plugins", "--json"], capsys)
    assert [p["name"] for p in json.loads(out)] == ["noise"]


def _fake_distribution(root, name, module_source, ep_value):
    """A distribution on sys.path whose entry point is `ep_value`, without pip."""
    dist = root / f"{name.replace('-', '_')}-9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n")
    (dist / "entry_points.txt").write_text(f"[normlab]\n{ep_value}\n")
    mod, src = module_source
    (root / f"{mod}.py").write_text(textwrap.dedent(src))


def test_broken_plugin_is_listed_with_its_error_and_named_when_used(tmp_path, monkeypatch, capsys, write_yaml):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "normlab-broken", ("nl_broken", "import does_not_exist\n"), "broken = nl_broken")
    _fake_distribution(site, "normlab-badhook", ("nl_badhook", """
        from normlab import hookimpl
        @hookimpl
        def on_los(batch):
            pass
        """), "badhook = nl_badhook")
    monkeypatch.syspath_prepend(str(site))
    code, out, _ = run_cli(["plugins", "--json"], capsys)
    assert code == 0
    listing = {p["name"]: p for p in json.loads(out)}
    assert "noise" in listing and listing["noise"]["error"] is None
    assert "ModuleNotFoundError" in listing["broken"]["error"]
    assert listing["broken"]["distribution"] == "normlab-broken"
    assert "on_los" in listing["badhook"]["error"]
    code, out, _ = run_cli(["plugins", "--check"], capsys)
    assert code == 1 and "error: failed to import nl_broken" in out  # a check that found a broken plugin fails
    code, out, _ = run_cli(["plugins"], capsys)  # from metadata: listed, not imported
    assert code == 0 and "broken 9.9 (normlab-broken, nl_broken)" in out and "ModuleNotFoundError" not in out
    path = write_yaml("plugins: [broken]")
    code, _, err = run_cli(["run", path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "plugin 'broken' is installed but failed to load" in err
    assert not (tmp_path / "o").exists()


def test_hook_wrappers_are_rejected_with_the_plugin_named():
    from normlab import hookimpl
    from normlab.manager import inspect_plugin

    class Wrapper:
        @hookimpl(wrapper=True)
        def on_batch(self, batch, ctx):
            return (yield)

    info = inspect_plugin("wrap", Wrapper())
    assert info.error == ("invalid plugin: ValueError: on_batch: hook wrappers are not supported "
                          "(the host calls hooks in order)")


@pytest.mark.parametrize("text, pattern", [
    ("trian: {epochs: 3}", r"trian: unknown key \(did you mean 'train'\?\)"),
    ("plugins: {advnb: {}}", r"plugins: unknown plugin 'advnb' \(did you mean 'advbn'\?\)"),
    ("plugins: [future]", r"plugins: plugin 'future' is not installed; install it with: pip install normlab-future"),
    ("plugins: {bnrect: {n_smaples: 8}}", r"plugins.bnrect.n_smaples: unknown key \(did you mean 'n_samples'\?\)"),
    ("plugins: {pgd: {eps: 8/0}}", r"plugins.pgd.eps: Value error|plugins.pgd.eps: expected a number or a fraction"),
    ("plugins: {condition: {choices: [2.0]}, pgd: {}}", r"plugins.condition: choices must lie in \[0, 1\]"),
    ("evaluate: {pgd: {stepz: 3}}", r"evaluate.pgd.stepz: unknown key \(did you mean 'steps'\?\)"),
    ("evaluate: {autoattak: {}}", r"evaluate.autoattak: unknown evaluator \(did you mean 'autoattack'\?\)"),
    ("evaluate: {corruptions: {corruptions: [fogg]}}", r"evaluate.corruptions.corruptions: unknown corruption 'fogg'"),
    ("evaluate: {autoattack: {implementation: torchattacks, version: fast}}",
     r"evaluate.autoattack: version 'fast' exists only for implementation 'pyautoattack'"),
    ("evaluate: {sweep: {knob: lam, values: [0], evaluators: {fgsm: {eps: -1}}}}",
     r"evaluate.sweep.evaluators.fgsm.eps: Input should be greater than or equal to 0"),
])
def test_bad_run_files_are_refused_before_torch_is_imported(text, pattern, tmp_path):
    """Issue 16: the run file, the plugin names and every settings section (plugins' and evaluators') are
    checked from metadata and torch-free settings modules, so refusing is fast."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    probe = (f"import sys, normlab_registry, normlab.cli as c\n{FUTURE}\n"
             "code = c.main(['run', sys.argv[1], '--out', sys.argv[2]])\n"
             "print('torch' in sys.modules, file=sys.stderr)\nsys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, str(path), str(tmp_path / "o")], capture_output=True,
                          text=True, env=subprocess_env())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1] == "False", proc.stderr[-2000:]
    assert len(lines) == 2 and re.search(pattern, lines[0]), lines
