"""Learning-rate schedules and optimizers, checked by value."""

import math

import pytest
import torch

from normlab.config import TrainConfig
from normlab.train import build_optimizer, build_scheduler, lr_factor


def lrs(cfg, steps_per_epoch):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, steps_per_epoch, cfg)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup():
    cfg = TrainConfig(epochs=4, lr=0.2, warmup_epochs=1, schedule="cosine")
    got = lrs(cfg, 10)
    assert got[:3] == pytest.approx([0.02, 0.04, 0.06])
    assert got[9] == pytest.approx(0.2)
    assert got[10] == pytest.approx(0.2)  # cosine starts at the peak after warm-up
    assert got[25] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert all(a >= b for a, b in zip(got[10:], got[11:]))


def test_step_schedule_milestones():
    cfg = TrainConfig(epochs=4, lr=0.1, schedule="step", milestones=[2, 3], gamma=0.1)
    got = lrs(cfg, 5)
    assert got[9] == pytest.approx(0.1) and got[10] == pytest.approx(0.01) and got[15] == pytest.approx(0.001)


def test_constant_and_factor_bounds():
    cfg = TrainConfig(epochs=2, lr=0.3, schedule="constant")
    assert set(lrs(cfg, 3)) == {0.3}
    assert lr_factor(10_000, 10, TrainConfig(epochs=2)) == pytest.approx(0.0)


def test_optimizers():
    p = [torch.nn.Parameter(torch.zeros(1))]
    sgd = build_optimizer(p, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 1e-4
    adamw = build_optimizer(p, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05


def test_adamw_run_trains(tiny_config, tmp_path):
    import normlab

    tiny_config["train"].update(optimizer="adamw", lr=1e-3, weight_decay=0.01, epochs=2)
    res = normlab.run(tiny_config, out=tmp_path / "r", quiet=True)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
