"""``robustbench``: RobustBench's numbers for the run's model: clean accuracy and accuracy under a threat model.

Two paths compute the same outputs; the results say which one ran and why.

``benchmark``: ``robustbench.eval.benchmark()`` itself, given normlab's model
(which takes [0, 1] inputs, as benchmark() feeds them). It runs when all hold:

1. ``threat_model`` is Linf or L2 and ``version`` is standard (benchmark() runs
   only the standard AutoAttack). For ``corruptions``, benchmark() reads
   AlexNet's accuracies from ``model_info/<dataset>/corruptions/
   unaggregated_results.csv`` under the *current directory* (a file of
   robustbench's git repository, not of its wheel: without it benchmark() ends
   in ``KeyError: 'AlexNet'``, after creating ``./model_info``), so it runs
   only where that file exists.
2. The benchmark dataset is in ``data_dir`` (CIFAR: torchvision's extracted
   ``cifar-10-batches-py`` / ``cifar-100-python``, checked without
   downloading; ImageNet: ``data_dir/val``; corruptions: ``CIFAR-10-C``,
   ``CIFAR-100-C`` or ``ImageNet-C`` in robustbench's layout). robustbench
   would download what is missing; normlab never lets it.
3. The ``autoattack`` module robustbench imports (normlab's adapter over
   pyautoattack, :mod:`normlab.adapters.autoattack`) behaves as benchmark()
   needs. This is probed once per process with the exact call benchmark() makes
   (``AutoAttack(model, norm=, eps=, version='standard', device=, log_path=)``,
   then ``run_standard_evaluation(x, y, bs=, state_path=None)``) on a constant
   model that no attack runs on, and checking that it returns the adversarial
   images as a tensor. With pyautoattack 0.2.0 aliased as is, the constructor
   fails (``TypeError: unexpected keyword argument 'log_path'``), and
   pyautoattack 0.2's ``run_standard_evaluation`` returns ``(x_adv, y_adv)``
   where benchmark() expects ``x_adv`` (``AttributeError: 'tuple' object has no
   attribute 'shape'`` in ``clean_accuracy``). The adapter maps both, so the
   probe passes; it stays as a guard against other pyautoattack releases.

``equivalent``: otherwise, the same computation done by normlab: clean
accuracy of the first ``n_examples`` images (argmax, fp32) and, for Linf/L2,
the accuracy on the adversarial images that the original AutoAttack (through
the adapter, ``version`` standard as in benchmark(), or fast: APGD-CE and APGD-T
with the standard settings) returns; for corruptions, the mean accuracy over
15 corruptions x 5 severities read with robustbench's own loaders
(``load_cifar10c``, ``load_cifar100c``, ``load_imagenetc``). The images are the
benchmark dataset's, through robustbench's loaders, when it is in
``data_dir``, and otherwise normlab's own test split (a fixed draw of
``n_examples``); corruptions need the real corruption data (normlab's
``corruptions`` evaluator generates corruptions of the run's own data).

``dataset`` is the run's own benchmark: on MNIST none, on CIFAR the run's, and
another named one is refused before training (its images through this model, or
this run's images at its budget, are not its numbers); an image folder may be
any of the three, and defaults to the zoo backbone's dataset.

Keys: ``robustbench/clean_acc``, ``robustbench/adv_acc`` (and
``robustbench/<version>/adv_acc`` for Linf/L2, ``robustbench/corruptions/
<name>/<severity>/acc`` for corruptions), ``robustbench/used_benchmark`` (1:
benchmark() ran, 0: the equivalent), ``robustbench/benchmark_data`` (1: the
benchmark dataset from ``data_dir``, 0: normlab's own test split),
``robustbench/n`` and ``robustbench/eps``. The reason for the path is logged
and, where the report keeps records, stored under ``records.robustbench``.
benchmark() seeds AutoAttack from the clock (robustbench passes no seed); the
equivalent seeds it from ``seed`` or the run's seed.
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from . import Evaluator, examples, test_loader
from .settings import RobustbenchEvalConfig
from .attacks import attack_mode, default_eps, keep_trace, seeded
from .corruptions import released_rows

__all__ = ["RobustbenchEvalConfig", "available", "benchmark_problem", "adapter_problem"]

CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
CORRUPTION_DIRS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C", "imagenet": "ImageNet-C"}
MAX_EXAMPLES = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000}


# --- which path -----------------------------------------------------------------

class _Constant(torch.nn.Module):
    """Always predicts class 0 (equal logits): every label-1 image is misclassified, so no attack runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 10, device=x.device) + 0.0 * x.flatten(1)[:, :1]


@functools.cache
def adapter_problem() -> str | None:
    """Why ``robustbench.eval.benchmark()`` cannot use the installed ``autoattack`` module, or None if it can.

    Makes the two calls benchmark() makes, on a model no attack runs on.
    """
    import robustbench.eval as rbe

    cls = rbe.AutoAttack
    where = f"{cls.__module__}.{cls.__qualname__}"
    x, y = torch.zeros(1, 3, 8, 8), torch.ones(1, dtype=torch.long)
    try:
        with keep_trace(), contextlib.redirect_stdout(io.StringIO()):
            adversary = cls(_Constant(), norm="Linf", eps=8 / 255, version="standard", device=torch.device("cpu"),
                            log_path=None)
            out = adversary.run_standard_evaluation(x, y, bs=1, state_path=None)
    except Exception as e:  # the probe reports the failure instead of raising it
        return f"benchmark()'s call to {where} fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if not isinstance(out, torch.Tensor):
        return (f"{where}.run_standard_evaluation returns a {type(out).__name__} (pyautoattack 0.2 returns "
                f"(x_adv, y_adv)), but benchmark() needs the adversarial images: it would fail in "
                f"clean_accuracy(model, x_adv, ...)")
    return None


def available(dataset: str, threat_model: str, data_dir: Path) -> int:
    """How many test images robustbench's loader finds for ``dataset`` in ``data_dir`` without downloading (0: none).

    For corruptions: images per corruption and severity.
    """
    if threat_model == "corruptions":
        from robustbench.data import CORRUPTIONS

        root = data_dir / CORRUPTION_DIRS[dataset]
        if dataset == "imagenet":
            ok = all((root / c / str(s)).is_dir() for c in CORRUPTIONS for s in range(1, 6))
            return MAX_EXAMPLES[dataset] if ok else 0
        if not ((root / "labels.npy").is_file() and all((root / f"{c}.npy").is_file() for c in CORRUPTIONS)):
            return 0
        import numpy as np

        return len(np.load(root / "labels.npy", mmap_mode="r")) // 5
    if dataset == "imagenet":
        return MAX_EXAMPLES[dataset] if (data_dir / "val").is_dir() else 0
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        return len(cls(str(data_dir), train=False, download=False))  # checks the files' md5 sums
    except RuntimeError:
        return 0


def benchmark_problem(cfg: RobustbenchEvalConfig, dataset: str | None, data_dir: Path, clean: bool,
                      corrupted: bool) -> str | None:
    """Why benchmark() cannot be used for these settings, or None if it can (see the module doc).

    ``clean`` / ``corrupted``: whether robustbench finds the clean test set / the corruption data in ``data_dir``.
    """
    if dataset is None:
        return f"the run's data is not a robustbench dataset (set {cfg.key}.dataset)"
    if not clean:
        return f"the {dataset} test set is not in {data_dir} (robustbench would download it)"
    if cfg.threat_model == "corruptions":
        if not corrupted:
            return f"{CORRUPTION_DIRS[dataset]} is not in {data_dir} (robustbench would download it)"
        csv = Path("model_info") / dataset / "corruptions" / "unaggregated_results.csv"
        if not csv.is_file():
            return (f"benchmark()'s corruptions path needs {csv} (AlexNet's accuracies, from robustbench's "
                    f"repository, not its wheel) in the current directory")
        return None
    if cfg.version != "standard":
        return "benchmark() runs only AutoAttack's standard version"
    return adapter_problem()


# --- the evaluator ----------------------------------------------------------------

def _dataset(run, cfg: RobustbenchEvalConfig) -> str | None:
    if cfg.dataset is not None:
        return cfg.dataset
    if run.data.name != "imagefolder":  # named data: its own benchmark (CIFAR) or none (MNIST), whatever the model
        return run.data.name if run.data.name in CLASSES else None
    zoo = run.config.model.robustbench
    return zoo.dataset if zoo is not None else None


def _data_dir(run, cfg: RobustbenchEvalConfig) -> Path:
    from ..data import _default_root

    path = cfg.data_dir or run.config.data.root
    return Path(path).expanduser() if path else _default_root()



@torch.no_grad()
def _accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, device, desc: str, quiet) -> float:
    """robustbench.utils.clean_accuracy: argmax accuracy in fp32, batch by batch."""
    correct = 0
    for i in tqdm(range(0, len(y), batch_size), desc=desc, leave=False, disable=quiet):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        correct += int((model(xb).argmax(1) == yb).sum())
    return correct / max(len(y), 1)


def _own_split(run, cfg: RobustbenchEvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*test_loader(run, cfg))
    return torch.cat(xs), torch.cat(ys)


def _preprocessing(run, dataset: str) -> str | None:
    """robustbench's preprocessing name: ImageNet needs one (the zoo backbone's own, else Res256Crop224)."""
    if dataset != "imagenet":
        return None
    zoo = run.config.model.robustbench
    if zoo is not None and zoo.dataset == "imagenet":
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

        entry = model_dicts[BenchmarkDataset.imagenet][ThreatModel(zoo.threat_model)].get(zoo.name, {})
        return entry.get("preprocessing") or "Res256Crop224"
    return "Res256Crop224"


def _clean_set(run, dataset: str, n: int, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images of ``dataset`` as benchmark() loads them (robustbench's loader)."""
    from robustbench.data import get_preprocessing, load_clean_dataset
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    ds = BenchmarkDataset(dataset)
    prepr = get_preprocessing(ds, ThreatModel.Linf, None, _preprocessing(run, dataset))
    return load_clean_dataset(ds, n, str(data_dir), prepr)


def _autoattack(model, run, cfg: RobustbenchEvalConfig, norm: str, eps: float, seed: int):
    """The original AutoAttack through normlab's adapter, as benchmark() builds it (plus a seed)."""
    from ..adapters.autoattack import AutoAttack

    adversary = AutoAttack(model, norm=norm, eps=eps, version="standard", device=run.device, seed=seed,
                           verbose=False)
    if cfg.version == "fast":  # the standard version's first two attacks, with its settings
        adversary.attacks_to_run = ["apgd-ce", "apgd-t"]
    most = run.data.num_classes - 1  # targeted attacks cannot target more classes than there are
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, most)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, most)
    return adversary


def check(run, cfg: RobustbenchEvalConfig) -> None:
    """Before training: a ``dataset`` other than the run's own named one is refused. robustbench's numbers for
    it would be another dataset's images through this model, or, without them in data_dir, this run's test
    split at the other dataset's budget, both filed as robustbench's. An image folder may hold any of them."""
    named = run.config.data.name
    if cfg.dataset is not None and named != "imagefolder" and cfg.dataset != named:
        expected = f"{named} or unset" if named in CLASSES else \
            f"it unset ({named} is not robustbench's: the run's own test split is evaluated at {named}'s budget)"
        raise UsageError(f"{run.source}: {cfg.key}.dataset: {cfg.dataset}, but the run trains on {named}; "
                         f"expected {expected}")


def robustbench_eval(model, ctx, report, cfg: RobustbenchEvalConfig) -> None:
    from ..adapters.robustbench import RobustbenchUnavailable, import_robustbench

    run = ctx.run
    try:
        import_robustbench()
    except RobustbenchUnavailable as e:
        raise UsageError(f"{run.source}: {cfg.key}: {e}") from None
    dataset = _dataset(run, cfg)
    if dataset is not None and CLASSES[dataset] != run.data.num_classes:
        raise UsageError(f"{run.source}: {cfg.key}.dataset: {dataset} has {CLASSES[dataset]} classes "
                         f"but the model has {run.data.num_classes}")
    data_dir = _data_dir(run, cfg)
    corruptions = cfg.threat_model == "corruptions"
    n_clean = available(dataset, "Linf", data_dir) if dataset is not None else 0
    n_corrupted = available(dataset, "corruptions", data_dir) if dataset is not None and corruptions else 0
    if corruptions and not n_corrupted:
        what = f"robustbench's {CORRUPTION_DIRS[dataset]} under {data_dir}" if dataset else \
            f"a robustbench dataset (set {cfg.key}.dataset) and its corruption data"
        raise UsageError(f"{run.source}: {cfg.key}.data_dir: threat_model 'corruptions' needs {what} "
                         f"(normlab does not download it; the `corruptions` evaluator generates corruptions of "
                         f"the run's own data)")
    problem = benchmark_problem(cfg, dataset, data_dir, n_clean > 0, n_corrupted > 0)
    path, why = ("benchmark", "all its conditions hold") if problem is None else ("equivalent", problem)
    run.log.info("robustbench: %s path (%s)", path, why)
    if n_clean:  # robustbench's own test images, as benchmark() loads them
        n = examples(run, cfg, min(n_clean, MAX_EXAMPLES[dataset]), f"robustbench's {dataset} test set")
        x, y = _clean_set(run, dataset, min(n, cfg.batch_size) if problem is None else n, data_dir)
    else:  # normlab's test split
        x, y = _own_split(run, cfg)
        n = len(y)
    norm = None if corruptions else cfg.threat_model
    eps = None
    if norm is not None:
        eps = float(cfg.eps) if cfg.eps is not None else default_eps(dataset or run.data.name, norm)
    seed = cfg.seed if cfg.seed is not None else run.config.seed
    with attack_mode(model), seeded(run.device, seed), ctx.active(), keep_trace():
        samples, positions = run.domain_samples()  # the run's test split is the clean domain
        if problem is None:
            with run.domain("clean", samples, ctx, positions):
                clean, adv = _benchmark(model, run, cfg, dataset, n, data_dir, eps)
        else:
            with run.domain("clean", samples, ctx, positions):
                clean = _accuracy(model, x, y, cfg.batch_size, run.device, "robustbench clean", run.quiet)
                if norm is not None:
                    adversary = _autoattack(model, run, cfg, norm, eps, seed)
                    with torch.no_grad(), ctx.using(inner=True):
                        x_adv = adversary.run_standard_evaluation(x, y, bs=cfg.batch_size)
                    x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv  # see adapter_problem()
                    adv = _accuracy(model, x_adv, y, cfg.batch_size, run.device, "robustbench adv", run.quiet)
                    report.proportion(f"robustbench/{cfg.version}/adv_acc", adv, n)
            if corruptions:
                n_per = examples(run, cfg, min(n_corrupted, MAX_EXAMPLES[dataset]),
                                 f"each set of robustbench's {CORRUPTION_DIRS[dataset]}")
                adv = _corruptions(model, ctx, cfg, dataset, n_per, data_dir, report)
    report.proportion("robustbench/clean_acc", clean, n)
    if corruptions:  # the mean over 75 corruption sets: each set has its interval
        report.add("robustbench/adv_acc", adv)
    else:
        report.proportion("robustbench/adv_acc", adv, n)
    report.add("robustbench/used_benchmark", 1.0 if problem is None else 0.0)
    report.add("robustbench/benchmark_data", 1.0 if n_clean else 0.0)
    report.add("robustbench/n", float(n))
    if eps is not None:
        report.add("robustbench/eps", eps)
    records = getattr(report, "records", None)
    if records is not None:
        records["robustbench"] = {"path": path, "why": why, "dataset": dataset, "threat_model": cfg.threat_model,
                                  "data_dir": str(data_dir) if n_clean or n_corrupted else None}


def _benchmark(model, run, cfg: RobustbenchEvalConfig, dataset: str, n: int, data_dir: Path,
               eps: float | None) -> tuple[float, float]:
    """robustbench.eval.benchmark() on normlab's model; its printed lines go to the run's log."""
    from robustbench.eval import benchmark

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        clean, adv = benchmark(model, n_examples=n, dataset=dataset, threat_model=cfg.threat_model,
                               data_dir=str(data_dir), corruptions_data_dir=str(data_dir), device=run.device,
                               batch_size=cfg.batch_size, eps=eps, preprocessing=_preprocessing(run, dataset))
    for line in out.getvalue().splitlines():
        run.log.info("robustbench: %s", line)
    return float(clean), float(adv)


def _corruptions(model, ctx, cfg: RobustbenchEvalConfig, dataset: str, n: int, data_dir: Path, report) -> float:
    """Mean accuracy over robustbench's 15 corruptions x 5 severities, read with robustbench's loaders.

    Each corruption and severity is its own test domain (``corruptions/NAME/SEVERITY``) for ``on_domain``.
    """
    from robustbench.data import CORRUPTIONS, PREPROCESSINGS, load_cifar10c, load_cifar100c, load_imagenetc

    run = ctx.run
    adapt, rows = released_rows(run, n, MAX_EXAMPLES[dataset], dataset == "imagenet")
    accs = []
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            if dataset == "imagenet":  # benchmark()'s preprocessing for ImageNet-C
                xc, yc = load_imagenetc(rows, severity, str(data_dir), False, [name], PREPROCESSINGS["Res224"])
            else:
                loader = load_cifar10c if dataset == "cifar10" else load_cifar100c
                xc, yc = loader(rows, severity, str(data_dir), False, [name])
            yc = yc.long()
            with run.domain(f"corruptions/{name}/{severity}", xc[adapt], ctx, adapt):
                acc = _accuracy(model, xc[:n], yc[:n], cfg.batch_size, run.device,
                                f"robustbench {name}/{severity}", run.quiet)
            report.proportion(f"robustbench/corruptions/{name}/{severity}/acc", acc, n)
            accs.append(acc)
    return sum(accs) / len(accs)


EVALUATORS = [
    Evaluator("robustbench", robustbench_eval,
              "RobustBench: robustbench/clean_acc and robustbench/adv_acc (Linf/L2: the original AutoAttack; "
              "corruptions: mean over 15 x 5), through robustbench.eval.benchmark() where it works, else an "
              "equivalent computation; robustbench/used_benchmark says which ran (the reason is logged)",
              check=check),
]
