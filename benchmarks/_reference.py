"""The papers' public training steps, run beside normlab's in the same process (issue 18).

The reference code stays outside the project: each benchmark takes ``--reference DIR``, a work tree of the
public repository (for example ``git -C MIRROR archive HEAD | tar -x -C DIR``), and imports from it. Only what
the reference needs to run on a CPU is adapted, and each adapter is named here:

- ``Tensor.cuda`` (and ``Module.cuda``) are the identity while a reference step runs: the code calls
  ``.cuda(configs.gpu)`` unconditionally;
- ``easydict`` (imported by the AdvBN code's ``utils`` for its YAML configs, which the step does not read) is a
  small dict with attribute access when the package is not installed;
- ``torch.autograd.set_detect_anomaly``: the AdvBN code switches autograd's anomaly detection on in every
  step (and leaves it on for the whole process); the ``anomaly`` side keeps that, the ``no anomaly`` side
  turns the call into a no-op, and anomaly mode is switched off again after every reference step, so that
  no other side runs under it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import types
from pathlib import Path

import torch
from torch import nn


class _AttrDict(dict):
    """``easydict.EasyDict``'s attribute access, for the reference's imports (nested dicts become _AttrDicts)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for k, v in self.items():
            if isinstance(v, dict):
                self[k] = _AttrDict(v)

    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


def import_reference(path: str, modules: tuple[str, ...], marker: str) -> list[types.ModuleType]:
    """Import ``modules`` from the reference work tree ``path`` (which must contain ``marker``)."""
    root = Path(path).resolve()
    if not (root / marker).is_file():
        raise SystemExit(f"--reference {path}: expected a work tree of the public code with {marker}")
    try:
        importlib.import_module("easydict")
    except ImportError:
        sys.modules["easydict"] = types.ModuleType("easydict")
        sys.modules["easydict"].EasyDict = _AttrDict
    sys.path.insert(0, str(root))
    return [importlib.import_module(m) for m in modules]


@contextlib.contextmanager
def on_cpu(anomaly: bool):
    """``.cuda()`` as the identity, and the reference's anomaly detection kept (``anomaly``) or skipped."""
    saved = torch.Tensor.cuda, nn.Module.cuda, torch.autograd.set_detect_anomaly
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    if not anomaly:
        torch.autograd.set_detect_anomaly = lambda *a, **k: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda, torch.autograd.set_detect_anomaly = saved
        torch.autograd.set_detect_anomaly(False)


class AdvbnReference:
    """azshue/AdvBN's ``train_imagenet.train`` on one batch: its ResNet-18 split after layer1 (``cut=1``, its
    ImageNet stem as timm's resnet18, the classifier replaced by one for the run's classes), its ``perturb``
    (6 sign steps of 0.2 on the mean / std multipliers, eps 1.1), clean + adversarial CE, SGD on the head
    only (the front frozen, as its ``main_worker``)."""

    def __init__(self, path: str, num_classes: int, pgd_steps: int, lr: float, anomaly: bool):
        train_imagenet, resnet = import_reference(path, ("train_imagenet", "models.resnet"), "train_imagenet.py")
        self.train = train_imagenet.train
        net = resnet.ResNet(resnet.BasicBlock, [2, 2, 2, 2], num_classes=1000, cut=1)
        net.head.fc = nn.Linear(net.head.fc.in_features, num_classes)
        self.model = nn.DataParallel(net)  # the code reaches the network as model.module; on CPU a plain call
        self.criterion = nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(net.head.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.configs = _AttrDict(gpu=None, rank=0, ngpus_per_node=1,
                                 TRAIN={"print_freq": 10 ** 9, "epochs": 1, "arch": "resnet18"},
                                 ADV={"n_repeats": pgd_steps, "fgsm_step": 0.2, "scale_eps": 1.1})
        self.anomaly = anomaly

    def step(self, x, y) -> None:
        with on_cpu(self.anomaly), contextlib.redirect_stdout(io.StringIO()):  # its per-step log line
            self.train([(x, y)], self.model, self.criterion, self.opt, 0, self.configs)


class OatReference:
    """VITA-Group/Once-for-All-Adversarial-Training's training step (OAT.py, ``--use2BN --efficient``): its
    ``BasicBlockOAT`` (dual BN, FiLM after the stem's and the blocks' BNs) stacked as a ResNet-18 (its
    ``ResNet34OAT`` with two blocks per stage: the CIFAR ResNet-18, timm's resnet18 with ``model.stem: cifar``),
    its ``element_wise_sample_lambda`` (choices 0, 0.1, 0.2, 0.3, 0.4, 1; the random orthogonal encoding of
    ``dim`` rows), its ``PGD`` attacker under its ``ctx_noparamgrad_and_eval``, SGD.

    OAT.py's training loop is module-level code (importing OAT.py would start a run), so this class re-states
    the loop body's sequence of calls, each into the reference's own functions and modules: the clean forward
    (lambda-0 rows through the clean BNs), the attack on the nonzero rows, the adversarial forward, the
    per-sample weighted loss, backward, step, and the ``.item()`` of its metrics.
    """

    CHOICES = [0.0, 0.1, 0.2, 0.3, 0.4, 1.0]

    def __init__(self, path: str, num_classes: int, dim: int, eps: float, steps: int, lr: float, seed: int = 0):
        import numpy as np

        oat, sample, context, pgd = import_reference(
            path, ("models.cifar10.resnet_OAT", "utils.sample_lambda", "utils.context", "attacks.pgd"),
            "OAT.py")
        block = oat.BasicBlockOAT
        net = oat.ResNet34OAT(num_classes=num_classes, FiLM_in_channels=dim, use2BN=True)
        kw = {"use2BN": True, "FiLM_in_channels": dim}
        stages = []
        for i, (c_in, c) in enumerate(((64, 64), (64, 128), (128, 256), (256, 512))):
            stages.append(nn.ModuleList([block(c_in, c, c, stride=1 if i == 0 else 2, **kw), block(c, c, c, **kw)]))
        net.bundle1, net.bundle2, net.bundle3, net.bundle4 = stages
        net.bundles = stages
        self.model = net
        self.opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.attacker = pgd.PGD(eps=eps, steps=steps, use_FiLM=True)
        self.sample, self.ctx_eval = sample.element_wise_sample_lambda, context.ctx_noparamgrad_and_eval
        self.encoding = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))[0]
        np.random.seed(seed)

    def step(self, x, y) -> None:
        import torch.nn.functional as F

        model = self.model
        with on_cpu(anomaly=True):
            model.train()
            lam_flat, lam, zeros = self.sample("disc", self.CHOICES, self.encoding, batch_size=x.shape[0])
            logits = model(x, lam, zeros)
            lc = F.cross_entropy(logits, y, reduction="none")
            with self.ctx_eval(model):
                x_adv = self.attacker.attack(model, x[zeros:], labels=y[zeros:], _lambda=lam[zeros:], idx2BN=0)
            logits_adv = model(x_adv.detach(), lam[zeros:], idx2BN=0)
            la = torch.cat([torch.zeros((zeros,)), F.cross_entropy(logits_adv, y[zeros:], reduction="none")])
            loss = torch.mean((1 - lam_flat) * lc + lam_flat * la)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            (logits.argmax(1) == y).float().mean().item(), (logits_adv.argmax(1) == y[zeros:]).float().mean().item()
            loss.item()
