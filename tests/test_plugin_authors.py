"""The plugin author's path (issue 16): settings listing, template, clear errors, the inner-forward flag."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

import normlab
from normlab import hookimpl
from normlab.cli import main
from normlab.errors import UsageError


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_name_shows_the_settings_with_defaults_and_descriptions(capsys):
    code, out, _ = cli(["plugins", "bnrect"], capsys)
    assert code == 0
    assert "hooks: on_domain, on_eval, on_model" in out
    assert "n_samples  int = 32  unlabeled samples per domain" in out
    assert "adapt      Literal['both', 'mean', 'var'] = 'both'" in out
    code, out, _ = cli(["plugins", "mixstyle", "--json"], capsys)
    record = json.loads(out)
    assert [s["name"] for s in record["settings"]] == ["layers", "p", "alpha", "eps"]
    assert record["settings"][0]["default"] == ["layer1"] and record["settings"][0]["type"] == "list[str]"
    code, _, err = cli(["plugins", "bnrct"], capsys)
    assert code == 2 and "plugins bnrct: no installed plugin of that name (did you mean 'bnrect'?)" in err


def test_new_plugin_writes_a_package_that_passes_its_own_tests(tmp_path, capsys):
    code, out, _ = cli(["new-plugin", "logit_sq", "--dir", tmp_path], capsys)
    root = tmp_path / "normlab-logit-sq"
    assert code == 0 and out.strip() == f"wrote {root}"
    assert 'logit_sq = "normlab_logit_sq"' in (root / "pyproject.toml").read_text()
    # its own tests, run here (as pytest would: each test function with a fresh tmp_path)
    spec = importlib.util.spec_from_file_location("test_logit_sq", root / "tests" / "test_logit_sq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [name for name in dir(module) if name.startswith("test_")]
    assert len(tests) == 2
    for name in tests:
        (tmp_path / name).mkdir()
        getattr(module, name)(tmp_path / name)
    sys.modules.pop("normlab_logit_sq", None)
    sys.path.remove(str(root / "src"))  # the generated test put it there
    code, _, err = cli(["new-plugin", "logit_sq", "--dir", tmp_path], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = cli(["new-plugin", "Bad-Name", "--dir", tmp_path], capsys)
    assert code == 2 and "expected a lower-case name" in err
    code, _, err = cli(["new-plugin", "other", "--dir", tmp_path / "missing"], capsys)
    assert code == 2 and "no such directory (create it first)" in err and not (tmp_path / "missing").exists()


def test_a_plugin_left_out_by_the_env_var_is_named_as_such(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NORMLAB_LOAD_PLUGINS", "noise")
    path = tmp_path / "run.yaml"
    path.write_text("plugins: {bnrect: {}}\n")
    code, _, err = cli(["run", path, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "plugins: 'bnrect' is installed, but NORMLAB_LOAD_PLUGINS='noise' leaves it out" in err


class AsksForMissingLayer:
    @hookimpl
    def on_model(self, model, run):
        run.request_feature("layer9", key="where")


class SeesInner:
    def __init__(self):
        self.seen = []

    @hookimpl
    def on_feature(self, name, feature, ctx):
        if ctx.training:
            self.seen.append(ctx.inner)


def test_a_missing_requested_layer_names_the_plugin_and_its_key(tmp_path):
    cfg = {"data": {"image_size": 16, "n_train": 64, "batch_size": 32}, "train": {"val_examples": 100, "epochs": 1},
           "plugins": {"asker": {}}}
    with pytest.raises(UsageError, match=r"config: plugins.asker.where: asked for backbone layer 'layer9', which "
                                         r"resnet18 lacks \(its top-level layers: conv1, bn1, .*layer4"):
        normlab.run(cfg, out=tmp_path / "r", plugins={"asker": AsksForMissingLayer()}, quiet=True)
    assert not (tmp_path / "r").exists()


@pytest.mark.usefixtures("one_thread")
def test_attack_forwards_during_training_have_ctx_inner_set(tmp_path):
    seer = SeesInner()
    cfg = {"data": {"image_size": 16, "n_train": 32, "batch_size": 32}, "train": {"val_examples": 100, "epochs": 1},
           "plugins": {"mixstyle": {"p": 0.0}, "seer": {}, "pgd": {"steps": 2, "eps": 0.1, "step_size": 0.05}},
           "evaluate": {"clean": {"n_examples": 32}}}
    normlab.run(cfg, out=tmp_path / "r", plugins={"seer": seer}, quiet=True)
    # one training step: pgd's one-time fold check (a plain and a folded forward) and 2 attack steps (inner;
    # torchattacks' PGD makes one forward per step), then the host forward
    assert seer.seen == [True, True, True, True, False], seer.seen
