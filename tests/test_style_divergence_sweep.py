"""Style domains, feature divergence, knob sweeps and the comparison table."""

import json

import pytest
import torch

import normlab
from normlab.cli import main
from normlab.evals.divergence import ChannelStats, symmetric_kl
from normlab.evals.style import color, invert, texture
from conftest import TINY_MODEL, copy_run
from plugins_for_tests import FlipAtHighLam


@pytest.fixture(scope="module")
def trained(small_trained, tmp_path_factory):
    """The shared small model, copied: these tests evaluate into its run directory."""
    import types

    return types.SimpleNamespace(dir=copy_run(small_trained, tmp_path_factory.mktemp("style") / "run"),
                                 metrics=small_trained.metrics)


def digits(n=16):
    x = torch.zeros(n, 3, 32, 32)
    x[:, :, 8:24, 14:18] = 1.0  # a bar: stroke pixels 1, background 0
    return x


def test_invert_and_color_by_value():
    x = digits()
    assert torch.equal(invert(x, torch.Generator()), 1 - x)
    out = color(x, torch.Generator().manual_seed(0))
    fg, bg = out[:, :, 10, 15], out[:, :, 0, 0]
    assert ((fg - bg).abs() >= 0.4 - 1e-6).all()
    assert (torch.maximum(fg, bg) >= 0.7).all() and (torch.minimum(fg, bg) <= 0.3).all()
    assert torch.equal(out[:, :, 0, 0], out[:, :, 31, 31])  # one background colour per image
    again = color(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and not torch.equal(out, color(x, torch.Generator().manual_seed(1)))


def test_texture_is_abs_difference_with_a_natural_patch():
    x = digits(4)
    out = texture(x, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    assert out[:, :, :4].std() > 0.01  # a texture, not a flat colour
    # with the same draw, a stroke pixel (1) shows 1 - patch where a background pixel (0) shows the patch
    x2 = x.clone()
    x2[:, :, 10, 15] = 0.0
    out2 = texture(x2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, :, 10, 15], 1 - out2[:, :, 10, 15])


def test_symmetric_kl_closed_form():
    m0, v1 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert float(symmetric_kl(m0, v1, m0, v1)) == pytest.approx(0.0, abs=1e-12)
    # N(0,1) vs N(1,1): each KL is 1/2
    assert float(symmetric_kl(m0, v1, m0 + 1, v1)) == pytest.approx(1.0)
    # N(0,1) vs N(0,4): KL = log 2 + 1/8 - 1/2 and log(1/2) + 2 - 1/2
    expect = (torch.log(torch.tensor(2.0)) + 1 / 8 - 0.5) + (torch.log(torch.tensor(0.5)) + 2 - 0.5)
    assert float(symmetric_kl(m0, v1, m0, 4 * v1)) == pytest.approx(float(expect))
    a, b = (torch.rand(5, dtype=torch.float64) for _ in range(2))
    assert float(symmetric_kl(a, b + 0.1, b, a + 0.1)) == pytest.approx(float(symmetric_kl(b, a + 0.1, a, b + 0.1)))


def test_channel_stats_match_torch():
    f = torch.randn(6, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0])[None, :, None, None] + 1.5
    st = ChannelStats()
    st(None, None, f[:4])
    st(None, None, f[4:])
    mean, var = st.mean_var()
    torch.testing.assert_close(mean, f.double().mean((0, 2, 3)))
    torch.testing.assert_close(var, f.double().var((0, 2, 3), unbiased=False))


def test_style_and_divergence_end_to_end(trained):
    res = normlab.evaluate(trained.dir, overrides=[
        "evaluate={style: {n_examples: 200}, divergence: {n_examples: 100, domains: [invert, texture]}}"], quiet=True)
    m = res.metrics
    for d in ("invert", "color", "texture"):
        assert 0.0 <= m[f"style/{d}/acc"] <= 1.0
    assert m["style/acc"] == pytest.approx((m["style/invert/acc"] + m["style/color/acc"] + m["style/texture/acc"]) / 3)
    assert m["style/acc"] < trained.metrics["clean/acc"]  # a model trained on plain digits loses accuracy
    layers = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert all(m[f"divergence/texture/{layer}"] > 0 for layer in layers)
    assert (trained.dir / "plots" / "divergence.png").stat().st_size > 1000
    saved = json.loads((trained.dir / "results.json").read_text())["metrics"]
    assert saved["clean/acc"] == trained.metrics["clean/acc"] and "style/texture/acc" in saved


def test_divergence_equals_a_hand_computation_at_one_layer(trained):
    """divergence/invert/layer1 is the mean over channels of KL(A||B) + KL(B||A) between normals fitted to
    layer1's channels on the evaluated clean digits (A) and the same digits inverted (B), computed here
    from a forward hook, torch.var_mean and the closed form, with the documented variance floor."""
    import math

    from normlab.config import load_run_file
    from normlab.data import build_data

    res = normlab.evaluate(trained.dir, overrides=[
        "evaluate={divergence: {n_examples: 64, domains: [invert], layers: [layer1]}}"], name="kl", quiet=True)
    model = res.model.eval()
    data = build_data(load_run_file(trained.dir / "run.yaml")[0].data, "run.yaml")
    clean = torch.cat([x for x, _ in data.loader("test", 1024, shuffle=False, n=64)])
    stats = []
    for x in (clean, 1 - clean):
        seen = []
        h = model.backbone.layer1.register_forward_hook(lambda m, i, o: seen.append(o.double()))
        with torch.no_grad():
            model(x)
        h.remove()
        var, mean = torch.var_mean(seen[0], dim=(0, 2, 3), correction=0)
        stats.append((mean, var))
    (ma, va), (mb, vb) = stats
    floor = 1e-3 * float(torch.cat([va, vb]).mean())
    total = 0.0
    for c in range(len(ma)):
        a, b, d2 = max(float(va[c]), floor), max(float(vb[c]), floor), float(ma[c] - mb[c]) ** 2
        total += 0.5 * math.log(b / a) + (a + d2) / (2 * b) - 0.5 + 0.5 * math.log(a / b) + (b + d2) / (2 * a) - 0.5
    assert res.metrics["kl/divergence/invert/layer1"] == pytest.approx(total / len(ma), rel=1e-6)
    assert total > 0


def test_sweep_over_a_declared_knob(trained, tmp_path):
    cfg = {"seed": 0, "model": {"name": TINY_MODEL, "checkpoint": str(trained.dir)}, "data": {"n_train": 64},
           "train": {"epochs": 0},
           "plugins": ["flip"],
           "evaluate": {"clean": {"n_examples": 200},
                        "sweep": {"knob": "lam", "values": [0, 0.25, 1], "evaluators": {"clean": {"n_examples": 200}}}}}
    res = normlab.run(cfg, out=tmp_path / "s", plugins={"flip": FlipAtHighLam()}, quiet=True)
    m = res.metrics
    assert m["sweep/lam=0/clean/acc"] == m["clean/acc"] == m["sweep/lam=0.25/clean/acc"]
    assert m["sweep/lam=1/clean/acc"] < 0.05  # negated logits pick the least likely class
    assert (res.dir / "plots" / "sweep_lam.png").is_file()


def test_sweep_of_an_undeclared_knob_is_refused_before_training(tmp_path, write_yaml, capsys):
    path = write_yaml({"evaluate": {"sweep": {"knob": "lam", "values": [0, 1]}}})
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "evaluate.sweep.knob: no enabled plugin declares knob 'lam'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    path = write_yaml({"evaluate": {"sweep": {"knob": "depth", "values": [0]}}})
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "evaluate.sweep: knob must be one of" in capsys.readouterr().err


def test_settings_name_their_own_key_in_what_an_evaluator_refuses_at_run_time():
    """An evaluator's message names the key its settings sit under: a sweep's nested style evaluator on data with
    no generated domains says evaluate.sweep.evaluators.style, the top-level one evaluate.style."""
    from types import SimpleNamespace

    from normlab.errors import UsageError
    from normlab.evals.settings import StyleConfig, validate_evaluators
    from normlab.evals.style import style

    evaluators = validate_evaluators({"style": {}, "sweep": {"knob": "lam", "values": [0],
                                                            "evaluators": {"style": {}}}}, "run.yaml")
    nested = evaluators["sweep"]._parsed["style"]
    assert (evaluators["style"].key, nested.key) == ("evaluate.style", "evaluate.sweep.evaluators.style")
    assert StyleConfig().key == "evaluate.style"  # settings made in code: the evaluator's top-level key
    assert nested.model_copy().key == nested.key
    ctx = SimpleNamespace(run=SimpleNamespace(source="run.yaml", data=SimpleNamespace(name="cifar10")))
    for cfg in (evaluators["style"], nested):
        with pytest.raises(UsageError, match=rf"^run.yaml: {cfg.key}: no domains: "):
            style(None, ctx, None, cfg)


def test_sweep_over_plugin_settings_equals_separate_evaluations(trained):
    style = {"n_examples": 200, "domains": ["invert"]}
    sweep = {"knob": "plugins.bnrect", "values": [{"n_samples": 4}, {"adapt": "mean"}],
             "evaluators": {"style": style}}
    res = normlab.evaluate(trained.dir, overrides=[
        f"evaluate={json.dumps({'sweep': sweep, 'style': style})}", "plugins.bnrect={n_samples: 16}"],
        name="abl", quiet=True)
    m = res.metrics
    n4 = normlab.evaluate(trained.dir, overrides=[f"evaluate={json.dumps({'style': style})}",
                                                  "plugins.bnrect={n_samples: 4}"], name="n4", quiet=True)
    mean = normlab.evaluate(trained.dir, overrides=[f"evaluate={json.dumps({'style': style})}",
                                                    "plugins.bnrect={n_samples: 16, adapt: mean}"], name="m", quiet=True)
    assert m["abl/sweep/bnrect.n_samples=4/style/invert/acc"] == n4.metrics["n4/style/invert/acc"]
    assert m["abl/sweep/bnrect.adapt=mean/style/invert/acc"] == mean.metrics["m/style/invert/acc"]
    # the style evaluator after the sweep ran with the run's own settings again (n_samples 16)
    records = json.loads((trained.dir / "results.json").read_text())["records"]
    assert records["abl/bnrect"]["domains"]["style/invert"]["n_samples"] == 16
    assert records["n4/bnrect"]["domains"]["style/invert"]["n_samples"] == 4
    assert (trained.dir / "plots" / "sweep_bnrect.png").is_file()


def test_sweep_over_plugin_settings_validates_each_value(trained, capsys):
    bad = {"knob": "plugins.bnrect.n_samples", "values": [8, 0]}
    assert main(["eval", str(trained.dir), "--set", f"evaluate={{sweep: {json.dumps(bad)}}}",
                 "--set", "plugins.bnrect={}", "--as", "bad"]) == 2
    assert "evaluate.sweep.values[1]" in capsys.readouterr().err
    off = {"knob": "plugins.bnrect.n_samples", "values": [8]}
    assert main(["eval", str(trained.dir), "--set", f"evaluate={{sweep: {json.dumps(off)}}}", "--as", "off"]) == 2
    assert "plugin 'bnrect' is not enabled" in capsys.readouterr().err


def table_rows(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """A compare table's header cells and its rows by metric (the footnote left out)."""
    lines = out.splitlines()
    return lines[0].split(), {ln.split()[0]: ln.split()[1:] for ln in lines[2:] if ln.strip()
                              and not ln.startswith("differences:")}


def test_compare_table_marks_missing_metrics(tmp_path, capsys):
    for name, metrics, seed in (("base", {"clean/acc": 0.9, "style/acc": 0.4, "style/invert/acc": 0.2}, 0),
                                ("advbn", {"clean/acc": 0.89, "pgd/acc": 0.1}, 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"metrics": metrics, "seed": seed}))
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "advbn")]) == 0
    header, rows = table_rows(capsys.readouterr().out)
    assert header == ["metric", "base", "advbn", "advbn", "-", "base"]
    assert rows["clean/acc"] == ["0.9000", "0.8900", "-0.0100", "untested"]  # no per-example outcomes stored
    assert rows["pgd/acc"] == ["-", "0.1000", "-"]
    assert rows["style/invert/acc"] == ["0.2000", "-", "-"]
    assert rows["seed"] == ["0", "1"]


def test_a_difference_without_a_test_says_why_and_one_seed_has_no_interval(tmp_path, capsys):
    """A difference that no test backs is marked untested with the reason in the footnote; a seed group of one
    seed shows no interval over seeds (a t interval needs two), in compare and in show."""
    import yaml

    from normlab.group import GROUP_YAML, summarize

    for name, acc in (("a", 0.9), ("b", 0.8)):
        group = tmp_path / name
        (group / "seed-0").mkdir(parents=True)
        (group / "seed-0" / "results.json").write_text(json.dumps({"metrics": {"clean/acc": acc}, "seed": 0}))
        (group / GROUP_YAML).write_text(yaml.safe_dump({"seeds": [0]}))
        summarize(group, [0])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    _, rows = table_rows(out)
    assert rows["clean/acc"] == ["0.9000", "0.8000", "-0.1000", "untested"]  # no "[0.900, 0.900]"
    assert "untested: a group of one seed has no spread over seeds" in out
    assert main(["show", str(tmp_path / "a")]) == 0
    assert "clean/acc  0.9000  (one seed: none)" in capsys.readouterr().out
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(json.dumps({"metrics": {"clean/acc": 0.85}, "seed": 0}))
    assert main(["compare", str(tmp_path / "r"), str(tmp_path / "a")]) == 0
    assert "untested: a run and a seed group are not paired" in capsys.readouterr().out


def test_compare_shows_an_evaluation_stored_under_a_name(tmp_path, capsys):
    run = tmp_path / "base"
    run.mkdir()
    metrics = {"clean/acc": 0.9, "corruptions/acc": 0.6, "corruptions/fog/acc": 0.2,
               "corruptions/fog/3/acc": 0.25, "bnrect/corruptions/acc": 0.7, "bnrect/corruptions/fog/acc": 0.4}
    (run / "results.json").write_text(json.dumps({"metrics": metrics, "seed": 3}))
    assert main(["compare", str(run), f"{run}:bnrect"]) == 0
    header, rows = table_rows(capsys.readouterr().out)
    assert header[:3] == ["metric", "base", "base:bnrect"]
    assert rows["corruptions/acc"] == ["0.6000", "0.7000", "+0.1000", "untested"]
    assert rows["corruptions/fog/acc"] == ["0.2000", "0.4000", "+0.2000", "untested"]
    assert rows["clean/acc"] == ["0.9000", "-", "-"] and "corruptions/fog/3/acc" not in rows
    assert main(["compare", f"{run}:nope"]) == 2
    assert "no metrics stored under 'nope'" in capsys.readouterr().err


def test_compare_plots_runs_and_sweeps_on_the_sa_ra_plane(tmp_path, capsys):
    oat, at = tmp_path / "oat", tmp_path / "at"
    for d in (oat, at):
        d.mkdir()
    sweep = {f"sweep/lam={v}/{k}": a for v, sa, ra in ((0, 0.95, 0.2), (1, 0.9, 0.5))
             for k, a in (("clean/acc", sa), ("pgd/acc", ra))}
    (oat / "results.json").write_text(json.dumps({"metrics": sweep, "seed": 0}))
    (at / "results.json").write_text(json.dumps({"metrics": {"clean/acc": 0.88, "pgd/acc": 0.45}, "seed": 0}))
    png = tmp_path / "sara.png"
    assert main(["compare", str(oat), str(at), "--plot", str(png)]) == 0
    assert f"plot: {png}" in capsys.readouterr().out and png.stat().st_size > 5000
    clean_only = tmp_path / "clean"
    clean_only.mkdir()
    (clean_only / "results.json").write_text(json.dumps({"metrics": {"clean/acc": 0.9}, "seed": 0}))
    assert main(["compare", str(clean_only), "--plot", str(tmp_path / "none.png")]) == 0
    assert "no run has both" in capsys.readouterr().out and not (tmp_path / "none.png").exists()
    # a --plot that cannot be written is refused in one line before anything is read (was a traceback, exit 1)
    (tmp_path / "afile").write_text("")
    for bad, why in ((tmp_path / "sara.txt", "expected a file name ending in .png"),
                     (tmp_path / "dir.png", "expected a file; a directory of that name exists"),
                     (tmp_path / "afile" / "x.png", "is not a writable directory)")):
        if bad.name == "dir.png":
            bad.mkdir()
        assert main(["compare", str(oat), "--plot", str(bad)]) == 2
        out, err = capsys.readouterr()
        assert err.strip().endswith(why) and f"--plot {bad}" in err and len(err.strip().splitlines()) == 1, err
        assert not out
