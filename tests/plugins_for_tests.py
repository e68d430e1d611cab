"""Plugins used by the tests, passed to normlab.run(plugins=...) directly."""

import os
import signal

import torch

from normlab import hookimpl


class Killer:
    """Kills its own process (SIGKILL, no cleanup) at NORMLAB_TEST_KILL_AT='epoch:step' (0-based epoch); in a
    distributed run only the process whose RANK is NORMLAB_TEST_KILL_RANK (default: every one)."""

    @hookimpl
    def on_batch(self, batch, ctx):
        at = os.environ.get("NORMLAB_TEST_KILL_AT")
        who = os.environ.get("NORMLAB_TEST_KILL_RANK")
        if at and (who is None or os.environ.get("RANK") == who):
            epoch, step = (int(v) for v in at.split(":"))
            start = epoch * (ctx.run.config.data.n_train // ctx.run.config.data.batch_size)
            if ctx.epoch == epoch and ctx.step - start == step:
                os.kill(os.getpid(), signal.SIGKILL)


class NaNAt:
    """Makes the loss non-finite at global step 3."""

    @hookimpl
    def on_loss(self, batch, model, ctx, terms):
        if ctx.step == 3:
            terms.add("boom", torch.full_like(terms["ce"], float("nan")))


class Raises:
    @hookimpl
    def on_batch(self, batch, ctx):
        raise RuntimeError("deliberate")


class Recorder:
    """Records which hooks fire, and with what, to check the host calls them."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def on_model(self, model, run):
        self.calls.append("on_model")
        run.request_feature("layer1")

    @hookimpl
    def on_batch_norm(self, name, module, model, run):
        self.calls.append(("on_batch_norm", name))

    @hookimpl
    def on_feature(self, name, feature, ctx):
        self.calls.append(("on_feature", name, tuple(feature.shape)))

    @hookimpl
    def on_batch(self, batch, ctx):
        self.calls.append("on_batch")

    @hookimpl
    def on_loss(self, batch, model, ctx, terms):
        self.calls.append(("on_loss", tuple(terms.losses)))

    @hookimpl
    def on_domain(self, model, domain, samples, ctx):
        self.calls.append(("on_domain", domain, samples.shape[0]))
        return lambda: self.calls.append(("restore", domain))

    @hookimpl
    def on_eval(self, model, ctx, report):
        self.calls.append("on_eval")
        report.add("recorder/seen", 1.0)


class FlipAtHighLam:
    """Declares the knob `lam`; its head negates the logits when the context's lam >= 0.5."""

    knobs = ("lam",)

    class Head(torch.nn.Module):
        def __init__(self, fc):
            super().__init__()
            self.fc = fc

        def forward(self, x):
            from normlab.context import current

            out = self.fc(x)
            lam = current().lam
            return -out if lam is not None and float(lam.flatten()[0]) >= 0.5 else out

    @hookimpl
    def on_model(self, model, run):
        model.fc = self.Head(model.fc)


class RankState:
    """At each epoch's end writes, per rank, a digest of the model's state (weights, statistics, the OAT matrix)
    and of run.state to NORMLAB_TEST_STATE_DIR/rank-R.json; raises at NORMLAB_TEST_RAISE_RANK's first step."""

    @hookimpl
    def on_batch(self, batch, ctx):
        if os.environ.get("NORMLAB_TEST_RAISE_RANK") == os.environ.get("RANK", "0") and ctx.step == 1:
            raise RuntimeError("this rank fails on purpose")

    @hookimpl
    def on_epoch(self, model, ctx, metrics):
        import hashlib
        import json

        out = os.environ.get("NORMLAB_TEST_STATE_DIR")
        if not out:
            return
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        state = {k: _describe(v) for k, v in sorted(ctx.run.state.items())}
        path = os.path.join(out, f"rank-{os.environ.get('RANK', '0')}.json")
        with open(path, "w") as f:
            json.dump({"model": h.hexdigest(), "run_state": state, "shard": list(ctx.run.shard)}, f)


def _describe(v, depth=0):
    """A rank-independent description of plugin state: values, tensors by content, objects by their fields."""
    import hashlib

    if depth > 4:
        return type(v).__name__
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor):
        return hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    if isinstance(v, dict):
        return {str(k): _describe(x, depth + 1) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple, set)):
        return [_describe(x, depth + 1) for x in (sorted(v, key=str) if isinstance(v, set) else v)]
    if isinstance(v, torch.nn.Module):
        return {"module": type(v).__name__, "state": _describe(dict(v.state_dict()), depth + 1)}
    fields = {k: x for k, x in vars(v).items() if not k.startswith("_")} if hasattr(v, "__dict__") else {}
    return {"object": type(v).__name__, **_describe(fields, depth + 1)}
