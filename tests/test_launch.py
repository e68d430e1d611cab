"""``normlab launch``: a grid of runs through submitit's local executor, relaunch skips what is finished."""

import json

import pytest

from normlab.cli import main
from conftest import TINY_MODEL

TINY = {"seed": 0, "model": {"name": TINY_MODEL}, "data": {"batch_size": 32, "n_train": 32, "image_size": 16},
        "train": {"epochs": 1, "lr": 0.05, "val_examples": 16}, "evaluate": {"clean": {"n_examples": 32}}}


@pytest.mark.slow
def test_a_two_by_two_grid_runs_through_submitit_and_a_relaunch_skips_the_finished_points(tmp_path, write_yaml,
                                                                                            capsys):
    path = write_yaml(TINY)
    group = tmp_path / "group"
    args = ["launch", str(path), "--grid", "train.lr=0.05,0.1", "--grid", "data.image_size=16,24", "--seeds", "0",
            "--out", str(group), "--parallel", "2"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "4 points x 1 seeds; 0 finished runs skipped, 4 to run (local executor)" in err
    record = json.loads((group / "launch.json").read_text())
    assert record["status"] == "done" and len(record["points"]) == 4
    points = sorted(p.name for p in group.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert points == ["train.lr=0.05,data.image_size=16", "train.lr=0.05,data.image_size=24",
                      "train.lr=0.1,data.image_size=16", "train.lr=0.1,data.image_size=24"]
    for p in points:  # each point is a seed group with its run; the run has the point's settings
        summary = json.loads((group / p / "group.json").read_text())
        run = json.loads((group / p / "seed-0" / "results.json").read_text())
        assert summary["metrics"]["clean/acc"]["values"] == [run["metrics"]["clean/acc"]]
        lr, size = (v.split("=")[1] for v in p.split(","))
        resolved = (group / p / "seed-0" / "run.yaml").read_text()
        assert f"lr: {lr}" in resolved and f"image_size: {size}" in resolved
    stamps = {p: (group / p / "seed-0" / "results.json").stat().st_mtime_ns for p in points}
    assert main(args) == 0
    assert "4 finished runs skipped, 0 to run" in capsys.readouterr().err
    assert stamps == {p: (group / p / "seed-0" / "results.json").stat().st_mtime_ns for p in points}
    # the same grid from a run file with other settings: its runs would be averaged with the finished ones
    other = write_yaml({**TINY, "train": {**TINY["train"], "momentum": 0.5}}, "other.yaml")
    assert main([*args[:1], str(other), *args[2:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "group.yaml: train.momentum: this point was launched with " in err and "gives 0.5" in err
    assert len(err.splitlines()) == 1
    assert json.loads((group / "launch.json").read_text())["file"] == str(path.resolve())  # not relabelled
    assert main(["compare", str(group)]) == 0
    table = capsys.readouterr().out
    assert all(p in table for p in points) and "clean/acc" in table
    assert main(["show", str(group)]) == 0  # each point's table (it said "no results.json")
    shown = capsys.readouterr().out
    assert [ln for ln in shown.splitlines() if ln.startswith("point ")] == [f"point {p}:" for p in record["points"]]
    assert shown.count("(one seed: none)") >= 4


def test_a_bad_grid_value_is_refused_before_anything_is_submitted(tmp_path, write_yaml, capsys):
    path = write_yaml(TINY)
    group = tmp_path / "group"
    code = main(["launch", str(path), "--grid", "train.lr=0.05,fast", "--seeds", "0", "--out", str(group)])
    assert code == 2
    assert "train.lr: Input should be a valid number" in capsys.readouterr().err
    assert not group.exists()
    assert main(["launch", str(path), "--grid", "train.lr", "--out", str(group)]) == 2
    assert "--grid train.lr: expected KEY=V1,V2" in capsys.readouterr().err
    assert main(["launch", str(path), "--grid", "seed=1,2", "--out", str(group)]) == 2
    assert "use --seeds for seeds" in capsys.readouterr().err
    # what only building the model finds (an unknown timm name in the second point) is refused before too
    code = main(["launch", str(path), "--grid", "model.name=resnet18,resnet1800", "--out", str(group)])
    assert code == 2 and "model.name: unknown timm model 'resnet1800'" in capsys.readouterr().err
    assert main(["launch", str(path), "--seeds", "0,0", "--out", str(group)]) == 2  # two jobs, one seed-0
    assert "--seeds 0,0: expected each seed once" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["launch", str(path), "--out", str(afile)]) == 2
    assert "a file of that name exists" in capsys.readouterr().err and afile.read_text() == "keep"
    for grid, said in (("train.lrr=0.1,0.2", "--grid train.lrr=0.1,0.2: train.lrr: unknown key"),
                       ("train.lr=[1,2", "--grid train.lr=[1,2: invalid YAML")):
        assert main(["launch", str(path), "--grid", grid, "--out", str(group)]) == 2
        assert capsys.readouterr().err.startswith(f"normlab: error: {said}"), grid
    assert not group.exists()


def test_slurm_without_sbatch_is_refused_before_the_group_is_written(tmp_path, write_yaml, capsys, monkeypatch):
    """It was refused after launch.json ("status": "running") and each point's group.yaml were written."""
    import normlab.launch

    monkeypatch.setattr(normlab.launch.shutil, "which", lambda name: None)
    group = tmp_path / "group"
    code = main(["launch", str(write_yaml(TINY)), "--grid", "train.lr=0.1", "--seeds", "0", "--executor", "slurm",
                 "--no-wait", "--out", str(group)])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().endswith("--executor slurm: no Slurm on this machine (sbatch not found); use "
                                              "--executor local") and len(err.strip().splitlines()) == 1, err
    assert not out and not group.exists()


def test_slurm_points_are_checked_on_this_cpu_and_submitted_with_their_own_device(tmp_path, write_yaml, capsys,
                                                                                  monkeypatch):
    """A login node without a GPU still launches a `train.device: cuda` grid (it exited 2 there)."""
    import normlab.launch

    if __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    submitted = []
    monkeypatch.setattr(normlab.launch.shutil, "which", lambda name: "/usr/bin/sbatch")
    monkeypatch.setattr(normlab.launch, "_executor", lambda *a: None)
    monkeypatch.setattr(normlab.launch, "_submit", lambda ex, kind, jobs, *a: submitted.extend(jobs) or [])
    group = tmp_path / "group"
    path = write_yaml({**TINY, "train": {**TINY["train"], "device": "cuda"}})
    code = main(["launch", str(path), "--grid", "train.lr=0.1,0.2", "--executor", "slurm", "--no-wait",
                 "--out", str(group)])
    assert code == 0, capsys.readouterr().err
    assert [job[2][1] for job in submitted] == [["train.lr=0.1", "seed=0", "seeds=null"],
                                                 ["train.lr=0.2", "seed=0", "seeds=null"]]
    assert "device: cuda" in (group / "train.lr=0.1" / "group.yaml").read_text()
    code = main(["launch", str(path), "--grid", "train.lr=0.1", "--out", str(tmp_path / "local")])
    assert code == 2 and "train.device: 'cuda' requested but no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("text", ['{"points": [1]}', '{"points": {"../x": []}}', "[]", "{"])
def test_a_damaged_launch_json_is_one_usage_error(tmp_path, capsys, text):
    (tmp_path / "launch.json").write_text(text)
    for command in (["show", str(tmp_path)], ["compare", str(tmp_path)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert f"{tmp_path / 'launch.json'}: " in err and len(err.splitlines()) == 1, err
