"""OAT conditioning: dual BN and FiLM on the loss weight lambda (Wang et al., NeurIPS 2020).

Once-for-all adversarial training trains one model for a whole range of
trade-offs between standard and robust accuracy. Every sample gets a lambda,
the weight of its adversarial loss in ``(1 - lambda) CE(x) + lambda CE(x_adv)``
(the pgd plugin computes that loss from ``ctx.lam``), and the model is told
lambda:

- **dual BN**: every BN layer becomes a clean / adversarial pair
  (:class:`~normlab.layers.RoutedNorm`); samples with lambda = 0 go through the
  clean BN, all others (and every adversarial example) through the adversarial
  one, at training and at test time;
- **FiLM** (:class:`~normlab.layers.FiLM`) over the encoding ``e(lambda)``, in
  one of two forms (``film_style``). ``oat``, the paper's code: after the
  stem's and the blocks' BNs (not the projection shortcuts'), ``x * mu(e) +
  sigma(e)``, ``(mu, sigma)`` the leaky-ReLU'd halves of one leaky-ReLU MLP
  ``d -> 2C -> 2C`` with PyTorch's default initialisation. ``normlab`` (the
  default): after every BN, ``x * (1 + s(e)) + t(e)`` from two zero-initialised
  ReLU MLPs, so training starts from the plain network. Measured on
  examples/oat.yaml (4 epochs, PGD-7): normlab's reaches SA 0.946 at lambda 0
  and SA 0.722 / RA 0.124 at lambda 1, the OAT code's 0.860 and 0.632 / 0.008
  (its FiLM scales every feature by a random, mostly small mu at the start).
  The encoding ``e(lambda)`` is a row of a random orthogonal
  ``dim x dim`` matrix (the QR of a Gaussian drawn from the run seed; a buffer,
  so it is saved with every checkpoint and reloads bit for bit), or a one-hot
  row, or lambda itself (``encoding: scalar``).

Training (``on_batch``): in ``fixed`` sampling the first ``ceil(zero_fraction *
N)`` rows of the (already shuffled) batch get lambda = 0 and the rest a uniform
draw from the nonzero choices; ``zero_fraction`` null is ``1 / len(choices)``,
which gives ``ceil(N / len(choices))`` zeros as the public code does. In
``iid`` sampling each row is 0 with probability ``zero_fraction``, else a
nonzero choice, and the batch is permuted once so that the zeros come first.
Either way the zeros are contiguous, so the routed BNs split the batch with
views (no gather or scatter). In a distributed run (``run.shard``) ``fixed``
sampling draws the global batch's lambdas and each process keeps its rows' (the
same lambdas per row as one process), while ``iid`` permutes each process's rows.

Test time (``on_domain``, knob ``lam``): lambda is any value in [0, 1]. A value
between two training choices gets the linear interpolation of their encodings
(normlab's extension: the public code only looks rows up); values outside the
choices' range get the nearest end's row. Lambda = 0 uses the clean BNs.

Ablations: ``dual_bn: false`` keeps one BN (with FiLM), ``film: false`` keeps the
dual BN without FiLM.

Speed: the host's :class:`~normlab.layers.FiLM` runs its MLPs once per distinct
encoding row of the batch (6 in training, not 128); :class:`CondNormAct` (the
host's NormAct with the same children and state-dict keys) fuses an eval-mode BN with FiLM into one ``addcmul``
(attacks and evaluation), with the per-layer coefficients kept across the
steps of an attack while nothing they depend on changes.
"""

from __future__ import annotations

import bisect
import math

import torch
from normlab import hookimpl
from normlab.context import Context, current
from normlab.errors import UsageError
from normlab.layers import FiLM, NormAct, RoutedNorm, as_norm_act, bn_affine, eval_bn, iter_norms
from torch import nn

from .settings import Config

requires = ("pgd",)
conflicts = ("nf", "advbn")
conflict_reasons = {
    "nf": "nf removes every BN layer, so there is no BN to duplicate",
    "advbn": "both route BN layers on ctx.route, and one field cannot hold two per-sample routings",
}
after = ()
knobs = ("lam",)

ROUTES = ("clean", "adv")
CODE_ATTR = "condition_code"  # the buffer-only submodule on the backbone (state-dict prefix)


def random_orthogonal(dim: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix: QR of a Gaussian from ``seed``, signs fixed by diag(R)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()


class LambdaCode(nn.Module):
    """Buffer-only module: the encodings of the training choices and of any lambda in between.

    ``matrix`` (persistent, so it travels with every checkpoint) holds the rows;
    row k encodes ``choices[k]``. ``values`` (not persistent: it comes from the
    run file) holds the choices.
    """

    def __init__(self, cfg: Config, seed: int):
        super().__init__()
        k = len(cfg.choices)
        if cfg.encoding == "orthogonal":
            matrix = random_orthogonal(cfg.dim, seed)
        elif cfg.encoding == "onehot":
            matrix = torch.eye(k)
        else:
            matrix = torch.tensor(cfg.choices, dtype=torch.float32)[:, None]
        self.register_buffer("matrix", matrix)
        self.register_buffer("values", torch.tensor(cfg.choices, dtype=torch.float32), persistent=False)
        self.choices = [float(c) for c in cfg.choices]
        self.order = sorted(range(k), key=lambda i: self.choices[i])  # choice indices by value

    @property
    def table(self) -> torch.Tensor:
        """(len(choices), D): the encoding of each training choice."""
        return self.matrix[: len(self.choices)]

    def encode(self, lam: float) -> torch.Tensor:
        """(1, D): the row of a training choice, or the interpolation of its neighbours' rows."""
        lam = float(lam)
        sorted_vals = [self.choices[i] for i in self.order]
        j = bisect.bisect_left(sorted_vals, lam)
        if j < len(sorted_vals) and math.isclose(sorted_vals[j], lam, abs_tol=1e-9):
            return self.table[self.order[j]][None].clone()
        if j == 0 or j == len(sorted_vals):  # outside the training range: the nearest end
            return self.table[self.order[min(j, len(sorted_vals) - 1)]][None].clone()
        lo, hi = sorted_vals[j - 1], sorted_vals[j]
        w = (lam - lo) / (hi - lo)
        return ((1 - w) * self.table[self.order[j - 1]] + w * self.table[self.order[j]])[None]

    def extra_repr(self) -> str:
        return f"choices={self.choices}, rows={tuple(self.matrix.shape)}"


def sample_indices(n: int, cfg: Config, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Choice indices (n,) for a batch, zeros first, and the row permutation (iid) or None (fixed).

    Drawn on the CPU from torch's global RNG (or ``generator``), so a resumed run repeats them.
    """
    zero = cfg.choices.index(0) if 0 in cfg.choices else -1
    nonzero = torch.tensor([k for k, c in enumerate(cfg.choices) if c != 0], dtype=torch.long)
    if cfg.sampling == "fixed":
        n0 = min(n, math.ceil(cfg.zeros * n - 1e-9))
        rest = (nonzero[torch.randint(len(nonzero), (n - n0,), generator=generator)] if n > n0
                else torch.empty(0, dtype=torch.long))
        return torch.cat([torch.full((n0,), zero, dtype=torch.long), rest]), None
    is_zero = torch.rand(n, generator=generator) < cfg.zeros
    if len(nonzero):
        idx = torch.where(is_zero, zero, nonzero[torch.randint(len(nonzero), (n,), generator=generator)])
    else:
        is_zero[:] = True
        idx = torch.full((n,), zero, dtype=torch.long)
    perm = torch.argsort((~is_zero).to(torch.uint8), stable=True)
    return idx[perm], perm


class CondNormAct(NormAct):
    """:class:`~normlab.layers.NormAct` (same children and keys) that fuses an eval-mode BN with FiLM.

    When the BN that the context selects uses its running statistics (eval
    mode: attacks, evaluation) the layer is affine per sample and channel, so
    ``FiLM(BN(x))`` is one ``addcmul``: with FiLM's ``x * f + g``, ``x * a + b`` with ``a = w f``,
    ``b = (beta - mean w) f + g`` and ``w = gamma / sqrt(var + eps)``.
    In training mode, with per-sample routes, without a condition, or while the
    selected BN has hooks or a wrapped forward (bnrect estimating it:
    :func:`normlab.layers.eval_bn`) it runs norm, FiLM, drop and act one after the other.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = eval_bn(self.norm)
        coef = self._fused(bn, x.shape[0]) if bn is not None and isinstance(self.film, FiLM) else None
        if coef is None:
            return super().forward(x)
        a, b = coef
        return self.act(self.drop(torch.addcmul(b.to(x.dtype)[:, :, None, None], x, a.to(x.dtype)[:, :, None, None])))

    def _fused(self, bn: nn.BatchNorm2d, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a, b), each (n or 1, C), of ``FiLM(BN(x)) = x * a + b``; None without a condition.

        Without parameter gradients (attacks, evaluation) the result is kept until the
        condition, the BN or the FiLM parameters change, so the steps of an attack reuse it.
        """
        c = current().condition
        if c is None:
            return None
        tensors = (bn.running_mean, bn.running_var, bn.weight, bn.bias, *self.film.parameters())
        key = (c, c._version, bn) + tuple(None if t is None else t._version for t in tensors)
        cache = self.__dict__.get("_fused_cache")
        if cache is not None and len(cache[0]) == len(key) and all(
                k is q if isinstance(k, (torch.Tensor, nn.Module)) else k == q for k, q in zip(cache[0], key)):
            return cache[1]
        a, shift = self.film.coefficients(n, bn.num_features)  # a slimmed width: its first channels
        w, b = bn_affine(bn)
        out = (a * w, a * b + shift)
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        self.__dict__["_fused_cache"] = None if grads else (key, out)
        return out



def _is_shortcut(name: str) -> bool:
    """Whether BN ``name`` normalises a projection shortcut (timm ResNets: ``layerN.M.downsample.1``)."""
    return ".downsample." in f".{name}."


def _channels(norm: nn.Module) -> int:
    if hasattr(norm, "num_features"):
        return int(norm.num_features)
    return max(int(m.num_features) for m in norm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _code(run) -> LambdaCode:
    return run.state["condition"]


@hookimpl
def on_model(model, run):
    cfg: Config = run.plugin_config("condition")
    if (cfg.dual_bn or cfg.film) and next(iter_norms(model), None) is None:
        what = "dual_bn" if cfg.dual_bn else "film"
        raise UsageError(f"{run.source}: plugins.condition.{what}: expected a backbone with BatchNorm layers; "
                         f"{type(model).__name__} ({run.config.model.name}) has none")
    if cfg.sampling == "iid" and "augmix" in run.enabled:
        raise UsageError(f"{run.source}: plugins.condition.sampling: expected 'fixed' with augmix; 'iid' "
                         f"reorders the batch's rows, which breaks AugMix's layout (clean rows, then each view)")
    if hasattr(model, CODE_ATTR):
        raise UsageError(f"{run.source}: plugins.condition: expected a backbone without a {CODE_ATTR!r} "
                         f"attribute; {run.config.model.name} already has one")
    code = LambdaCode(cfg, run.config.seed)
    model.add_module(CODE_ATTR, code)
    run.state["condition"] = code
    return None


@hookimpl
def on_batch_norm(name, module, model, run):
    cfg: Config = run.plugin_config("condition")
    if not (cfg.dual_bn or cfg.film):
        return None
    layer = as_norm_act(module)
    film_here = cfg.film and not (cfg.film_style == "oat" and _is_shortcut(name))
    if film_here and layer.film is not None:
        raise UsageError(f"{run.source}: plugins.condition.film: expected layer {name!r} without FiLM; "
                         f"another plugin already put one there")
    channels = _channels(layer.norm)
    if cfg.dual_bn:
        layer.norm = RoutedNorm.copies(layer.norm, ROUTES)
    if film_here:
        hidden = cfg.hidden or (None if cfg.film_style == "oat" else cfg.dim)
        film = FiLM(channels, cfg.code_dim, hidden, style=cfg.film_style)
        if type(layer) is NormAct:  # the fused eval path; a subclass from another plugin keeps its forward
            layer = CondNormAct(layer.norm, drop=layer.drop, act=layer.act).train(layer.training)
        layer.film = film.train(layer.training)
    return layer


@hookimpl
def on_batch(batch, ctx: Context):
    run = ctx.run
    cfg: Config = run.plugin_config("condition")
    code = _code(run)
    n = batch.x.shape[0]
    rank, world = getattr(run, "shard", (0, 1))
    if world > 1 and cfg.sampling == "fixed":  # the global batch's lambdas (as one process draws them), these rows'
        idx, perm = sample_indices(n * world, cfg)
        idx = idx[rank * n: (rank + 1) * n]
    else:  # iid in a distributed run: each process permutes its own rows (differs from a 1-process run)
        idx, perm = sample_indices(n, cfg)
    device = batch.x.device
    if perm is not None:
        perm = perm.to(device)
        batch.x, batch.y = batch.x[perm], batch.y[perm]
        n = perm.numel()
        batch.extra = {k: v[perm] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                       for k, v in batch.extra.items()}
    idx = idx.to(device, non_blocking=True)
    ctx.lam = code.values[idx]
    ctx.condition = code.table[idx] if cfg.film else None
    if cfg.dual_bn:
        ctx.set_route((ctx.lam != 0).long(), ROUTES)
        ctx.adv_route = "adv"
    return batch


@hookimpl
def on_domain(model, domain, samples, ctx: Context):
    """Apply the ``lam`` knob: the sweep's value if ``ctx.lam`` holds one, else the configured one."""
    cfg: Config = ctx.run.plugin_config("condition")
    if ctx.lam is not None and ctx.lam.numel() != 1:
        return None  # per-sample lambdas set by a training step: nothing to apply
    lam = float(ctx.lam) if ctx.lam is not None else cfg.lam
    code = _code(ctx.run)
    saved = (ctx.lam, ctx.condition, ctx.route)
    ctx.lam = torch.tensor([lam], device=code.matrix.device)
    ctx.condition = code.encode(lam) if cfg.film else None
    if cfg.dual_bn:
        ctx.route = "clean" if lam == 0 else "adv"

    def restore():
        ctx.lam, ctx.condition, ctx.route = saved

    return restore
