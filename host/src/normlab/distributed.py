"""One run on several processes: ``torchrun --nproc_per_node N -m normlab.cli run FILE`` (or ``normlab run
--nproc N FILE``).

The run file means the same experiment on any number of processes: ``data.batch_size`` is the global
batch, each of the N ranks takes its contiguous block of B / N rows of the same global batch a
1-process run would draw (:class:`normlab.data.EpochSampler` with ``rank`` and ``world``), the
gradients are averaged over the ranks after the step's last backward (:func:`all_reduce_gradients`),
and every rank takes the same optimizer step. Rank 0 alone writes the run directory (run.yaml, log,
checkpoints, metrics, results); every rank reads it to resume. Evaluation runs on rank 0 alone, after
the process group is closed (documented in the README).

Why not ``DistributedDataParallel``: its reducer assumes that one wrapped forward per backward reaches
every parameter that gets a gradient. Plugins break that: AdvBN's auxiliary BNs are used only in its
own tail forward, OAT's adversarial forward runs outside the host forward, and slim's passes use a
different set of BNs at each width ("Expected to mark a variable ready only once" with
``find_unused_parameters``). The host therefore all-reduces the gradients itself, in one flat tensor,
which is the averaged gradient DDP computes (without DDP's overlap of communication and backward).

BN statistics: with ``train.sync_bn`` every BN layer (those inside routed norms too) becomes a
:class:`SyncBatchNorm2d`, which normalises with the statistics of the global batch. Without it each
rank normalises with, and stores, the statistics of its own B / N rows (rank 0's are checkpointed):
AdvBN's per-batch feature statistics and any training-time BN statistic then describe B / N samples.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from .layers import copy_bn

__all__ = ["launched", "init", "close", "rank", "world", "is_main", "all_reduce_gradients", "SyncBatchNorm2d",
           "sync_batch_norms", "from_main", "mean_over_ranks", "sum_over_ranks"]


_groups = 0  # process groups this process has joined (one per distributed run)
_FLAT: dict = {}  # (dtype, device) -> the gradient all-reduce's flat buffer, emptied when the group closes


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl for CUDA, gloo for CPU); return this rank's device."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    global _groups
    timeout = datetime.timedelta(minutes=int(os.environ.get("NORMLAB_DIST_TIMEOUT_MIN", "30")))
    # torchrun's store outlives a process group, and a second default group would meet the first one's keys
    # there (a run after another in one process hung in its rendezvous): each group gets its own key prefix
    store, rank_, world_ = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    _groups += 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(
        f"normlab-{_groups}", store), rank=rank_, world_size=world_, timeout=timeout)
    return device


def close() -> None:
    """Leave the process group (after training: evaluation then runs on rank 0 alone, without collectives)."""
    _FLAT.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def from_main(value):
    """Rank 0's ``value`` on every rank (a checked path, or the UsageError that stops every rank alike)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_gradients(params: list[nn.Parameter]) -> None:
    """Average ``.grad`` over the ranks, in one flat all-reduce per dtype.

    A parameter with no gradient on any rank keeps ``None`` (the optimizer skips it, as in a 1-process
    run); one with a gradient on some ranks only counts zeros for the others.
    """
    n = world()
    if n == 1 or not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has)
    used = [p for p, h in zip(params, has.tolist()) if h]
    for dtype in {p.dtype for p in used}:
        group = [p for p in used if p.dtype == dtype]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = _flat_buffer(dtype, device, sum(g.numel() for g in grads))
        torch.cat([g.reshape(-1) for g in grads], out=flat)
        dist.all_reduce(flat)
        flat /= n
        offset = 0
        for p, g in zip(group, grads):
            k = g.numel()
            if p.grad is None:
                p.grad = g
            p.grad.copy_(flat[offset: offset + k].view_as(p))  # in place: the gradient keeps its layout
            offset += k


def _flat_buffer(dtype: torch.dtype, device: torch.device, numel: int) -> torch.Tensor:
    """The all-reduce's flat gradient buffer, kept from step to step (a fresh 45 MB buffer per step cost
    resnet18 28 ms on one CPU thread in page faults, against 5 ms to fill a kept one)."""
    buf = _FLAT.get((dtype, device))
    if buf is None or buf.numel() != numel:
        buf = _FLAT[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _comm_device() -> torch.device:
    """Where collective tensors must live: this rank's GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(values: dict) -> dict:
    """Each (scalar) value averaged over the ranks, in one all-reduce."""
    keys, device = list(values), _comm_device()
    flat = torch.stack([torch.as_tensor(values[k], device=device).reshape(()).to(torch.float64) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, (flat / world()).tolist()))


def sum_over_ranks(value) -> int:
    total = torch.as_tensor(value, dtype=torch.int64).reshape(1).to(_comm_device())
    dist.all_reduce(total)
    return int(total)


class _Sum(torch.autograd.Function):
    """A differentiable all-reduce (sum): the gradient of every rank's input is the sum of the ranks' output
    gradients (each rank's loss depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.SyncBatchNorm):
    """torch's ``SyncBatchNorm``, also on CPU (an adapter: torch raises "SyncBatchNorm expected input tensor
    to be on GPU" for CPU tensors, so gloo runs could not synchronise BN at all).

    On CUDA, in eval mode, or with one process it is torch's layer. On CPU in training mode with several
    ranks it normalises with the global batch's per-channel mean and biased variance, computed with two
    differentiable all-reduces (sums whose backward all-reduces the gradient: the mean first, then the
    squared deviations from it), and updates the running statistics with the unbiased global variance,
    as BatchNorm does. A rank with no rows still joins the all-reduces.
    """

    collective = True  # a routed norm runs it even with no rows (normlab.layers.RoutedNorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.device.type == "cpu" and world() > 1):
            return super().forward(x)
        all_reduce = _Sum.apply
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        layer = float(getattr(self, "layer_id", 0))  # the same on every rank: a mismatch shows in the sum
        extra = torch.tensor([float(x.numel() // max(x.shape[1], 1)), layer], dtype=x.dtype)
        total = all_reduce(torch.cat([x.sum(dims), extra]))
        if float(total[-1].detach()) != layer * world():
            raise RuntimeError(f"train.sync_bn: the processes normalised different BN layers at once (this one is "
                               f"synchronised layer {int(layer)}): some code path ran a BN on one process only")
        n = total[-2]
        mean = total[:-2] / n
        centred = x - mean.view(1, -1, *[1] * (x.dim() - 2))
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        shape = (1, -1, *[1] * (x.dim() - 2))
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class SyncBatchNormAct2d(SyncBatchNorm2d):
    """:class:`SyncBatchNorm2d` with timm ``BatchNormAct2d``'s ``drop`` and ``act`` (the same keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _synced(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    act = type(bn).__name__ == "BatchNormAct2d"
    new = copy_bn(bn, SyncBatchNormAct2d if act else SyncBatchNorm2d)
    if act:
        new.drop, new.act = bn.drop, bn.act
    return new


def sync_batch_norms(model: nn.Module) -> int:
    """Replace every BatchNorm2d (timm's BatchNormAct2d included, also inside routed norms) by its synchronised
    twin, keeping parameters, statistics and state-dict keys; return how many. Other BN kinds raise
    ValueError naming the layer."""
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SyncBatchNorm2d) or not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            if type(child) is not nn.BatchNorm2d and type(child).__name__ != "BatchNormAct2d":
                where = f"{name}.{child_name}" if name else child_name
                raise ValueError(f"train.sync_bn: cannot synchronise {where} ({type(child).__name__}); "
                                 f"expected BatchNorm2d or timm's BatchNormAct2d")
            n += 1
            synced = _synced(child)
            synced.layer_id = n  # module order, the same on every rank
            setattr(module, child_name, synced)
    return n
