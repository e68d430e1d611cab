"""Plugins used by the tests, passed to normlab.run(plugins=...) directly."""

import os
import signal

import torch

from normlab import hookimpl


class Killer:
    """Kills its own process (SIGKILL, no cleanup) at NORMLAB_TEST_KILL_AT='epoch:step' (0-based epoch)."""

    @hookimpl
    def on_batch(self, batch, ctx):
        at = os.environ.get("NORMLAB_TEST_KILL_AT")
        if at:
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
