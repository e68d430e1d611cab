"""Hook specifications: the whole contract between normlab and its plugins.

A plugin is a module (or object) registered under the entry-point group
``normlab``; it implements any of the hooks below with ``@normlab.hookimpl``.
Besides hooks, a plugin module may define these attributes:

``Config``
    A pydantic model for its section of the run file (``plugins: {name: {...}}``).
    The validated instance is ``run.plugin_config(name)``.
``requires`` / ``conflicts``
    Tuples of plugin names, checked before anything is built or trained.
``conflict_reasons``
    ``{other_name: "why"}``, shown when a conflict is reported.
``after``
    Plugin names that, when also enabled, must come earlier in ``plugins``.
``knobs``
    Names of the test-time knobs the plugin honours (``lam``, ``width``,
    ``route``); evaluators may sweep them.

Calling conventions. Hooks marked *chained* are called once per enabled plugin
in run-file order; each implementation receives the previous one's result
(returning None means "unchanged"). The others are called for every plugin in
run-file order and their return values are collected. No hook stops at the
first non-None result. Hook wrappers are not supported on chained hooks.

Objects passed to hooks:

``run`` (:class:`normlab.runner.Run`)
    The run being built: ``run.config`` (the validated run file),
    ``run.plugin_config(name)``, ``run.request_feature(layer)``, ``run.device``.
``ctx`` (:class:`normlab.context.Context`)
    The per-step state that modules read during a forward (BN ``route``,
    per-sample ``lam``, ``width``, a ``condition`` encoding), plus
    ``ctx.run``, ``ctx.training``, ``ctx.epoch``, ``ctx.step``,
    ``ctx.features`` (requested feature maps of the last forward) and
    ``ctx.state`` (a dict for plugins' scratch values for this step).
"""

from __future__ import annotations

import pluggy

PROJECT = "normlab"

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def on_model(model, run):
    """Whole-model surgery after the backbone is built, before norm layers are visited.

    :param model: the timm backbone (without the input-normalisation wrapper).
    :param run: the :class:`~normlab.runner.Run` being built.
    :return: a replacement backbone, or None to keep ``model`` (which may have
        been changed in place).

    Chained in run-file order: each plugin receives the previous result. Used
    for normalizer-free conversion and slimmable layers. A plugin that wants
    :func:`on_feature` calls for a layer asks for them here with
    ``run.request_feature(layer)``.
    """


@hookspec
def on_batch_norm(name, module, model, run):
    """Visit one normalization layer of the backbone.

    Called for every ``nn.BatchNorm2d`` (timm's ``BatchNormAct2d`` included) and
    every layer a previous plugin put in its place (:class:`~normlab.layers.NormAct`),
    in ``named_modules`` order.

    :param name: the layer's dotted name in the backbone (``layer1.0.bn1``).
    :param module: the current layer at that name (original or already wrapped).
    :param model: the backbone.
    :param run: the :class:`~normlab.runner.Run`.
    :return: a module to put at ``name``, or None to keep ``module``.

    Chained in run-file order, so wrappers compose (slimmable x dual BN gives one
    BN per width per route). A replacement must keep what the original fused in:
    use :func:`normlab.layers.as_norm_act`, which carries ``BatchNormAct2d``'s
    activation and drop over.
    """


@hookspec
def on_feature(name, feature, ctx):
    """See, or replace, the output of a layer a plugin requested.

    Forward hooks are installed only on layers named with
    ``run.request_feature``; other layers cost nothing.

    :param name: the requested layer's dotted name in the backbone.
    :param feature: its output tensor for the current forward.
    :param ctx: the :class:`~normlab.context.Context` of the forward.
    :return: a tensor of the output's shape to use instead of it, or None to keep it
        (another shape ends the run naming the plugin).

    Chained in run-file order. After the chain the final tensor is stored in
    ``ctx.features[name]``.
    """


@hookspec
def on_batch(batch, ctx):
    """Change a training batch before the forward (input-side methods: AugMix views, noise).

    :param batch: a :class:`~normlab.data.Batch` with ``x`` (N, C, H, W in [0, 1]),
        ``y`` (N,), and ``extra`` (dict: the third element of the loader's items when
        a plugin wrapped the training dataset, e.g. AugMix views).
    :param ctx: the step's :class:`~normlab.context.Context`; plugins may set its
        per-sample fields here (``ctx.lam``, ``ctx.route``) for the forward, and
        ``ctx.passes`` (a list of field overrides, slim's ``[{"width": 1.0}, ...]``):
        the host then runs the forward, every ``on_loss`` and the backward once per
        pass before one optimizer step.
    :return: a replacement batch, or None to keep ``batch`` (possibly changed in place).

    Chained in run-file order. Called on the training thread, so expensive
    per-image work belongs in the data pipeline instead (wrap ``run.data.train``
    in ``on_model``). A plugin that appends rows (views) keeps the original rows
    first, repeats ``y`` to match, and sets ``batch.extra["n_clean"]`` to the
    number of original rows; the host's training accuracy counts only those.
    """


@hookspec
def on_loss(batch, model, ctx, terms):
    """Add or reweight loss terms after the host's forward on ``batch``.

    :param batch: the batch as forwarded; ``batch.logits`` holds the host's output.
    :param model: the full model (input normalisation included), in train mode.
    :param ctx: the step's :class:`~normlab.context.Context` (with a pass's fields set, ``ctx.width``,
        when ``on_batch`` set ``ctx.passes``: then called once per pass, with a fresh ``terms``).
    :param terms: a :class:`~normlab.train.LossTerms` that already holds ``ce``
        (per-sample cross-entropy of ``batch.logits``). Use ``terms.add(name,
        per_sample_loss, weight)`` and ``terms.reweight(name, weight)``; weights
        are scalars or per-sample tensors.
    :return: ignored.

    Called for every plugin in run-file order. The host minimises
    ``sum over terms of mean(weight * loss)``.
    """


@hookspec
def on_domain(model, domain, samples, ctx):
    """Adapt the model to one test domain before it is evaluated there.

    :param model: the full model, in eval mode.
    :param domain: the domain's name (``clean``, ``corruptions/fog/3``, ``style/invert``).
    :param samples: a tensor of unlabeled inputs from that domain (N, C, H, W in [0, 1]): the
        first ``adapt_samples`` of the domain's fixed random order (a uniform draw over all its
        classes, the same whatever ``n_examples`` and batch size; a prefix of it is also one).
    :param ctx: the evaluation :class:`~normlab.context.Context`.
    :return: a zero-argument callable that undoes the adaptation exactly, or None
        if nothing was changed. The host calls every returned callable, in
        reverse order, after the domain's evaluation.

    Called for every plugin in run-file order. Labels are never passed.

    In an adaptive attack (``ctx.adaptive`` is True; an attack evaluator's ``adapt: adaptive``, see
    docs/adaptive.md) it is called before *every* forward of the attacked model, with ``samples``
    that forward's own input (it may require grad): adapt for that one forward, through autograd
    where the adaptation is differentiable (compute from the forward's tensors, write no buffer:
    the attack evaluators refuse a model whose buffers moved), and return the undo as usual. A
    discrete choice made from the samples is also reported by :func:`on_choices`.
    """


@hookspec
def on_choices(ctx):
    """The discrete test-time choices this plugin's :func:`on_domain` makes from the samples.

    :param ctx: the evaluation :class:`~normlab.context.Context` of the attack (the knobs a sweep
        set, such as ``ctx.route``, are in it).
    :return: ``{context field: [values]}`` (AdvBN's ``route: auto``: ``{"route": ["main", "aux"]}``),
        or None when the plugin chooses nothing from the samples.

    Called for every plugin in run-file order, once per adaptive attack. A choice has no gradient,
    so the adaptive attack attacks the model once with each combination of values fixed in the
    context (the plugin's :func:`on_domain` must then keep a value it finds set) and keeps, per
    batch, the adversarial images that the adapting model, choosing for itself, gets most wrong.
    """


@hookspec
def on_epoch(model, ctx, metrics):
    """Add per-epoch numbers to the epoch's row of ``metrics.csv`` (and see the others).

    :param model: the full model, in eval mode (the host restores train mode afterwards).
    :param ctx: a :class:`~normlab.context.Context` with ``ctx.run`` and ``ctx.epoch`` (0-based).
    :param metrics: the epoch's row, a dict: ``epoch``, ``lr``, ``train_loss``, ``train_acc``,
        ``loss/<term>``, ``val_acc``, ``seconds``; add finite numbers under keys that start
        with the plugin's name (``nf/branch_ratio/layer1.0``). Experiment trackers read it.
    :return: ignored.

    Called for every plugin in run-file order after the epoch's validation and before its
    checkpoint, so a resumed run has the rows of the epochs before. Runs under
    ``torch.no_grad``. A value that is not a finite number is a RunFailure naming the key.
    """


@hookspec
def on_log(ctx, metrics, plots):
    """Record numbers in an experiment tracker (TensorBoard, MLflow, ...).

    :param ctx: a :class:`~normlab.context.Context` with ``ctx.run`` (its ``dir``, ``resolved()``
        configuration and ``cost``); ``ctx.epoch`` is the epoch (0-based) for an epoch's row and
        ``None`` for a run's results.
    :param metrics: for an epoch, its finished row of ``metrics.csv`` (``train_loss``, ``loss/<term>``,
        ``val_acc``, what plugins added in :func:`on_epoch`); for the results, the metrics of the
        evaluation just written to results.json (``NAME/...`` after ``normlab eval --as NAME``).
        Read-only.
    :param plots: ``{}`` for an epoch; for the results, name -> PNG path of the plots written
        (``training``, ``corruptions``, ``sweep_lam``, ...).
    :return: ignored.

    Called for every plugin in run-file order, after every :func:`on_epoch` of an epoch (so the
    row is complete) and after results.json is written. A run resumed from epoch k calls it again
    for the epochs after k.
    """


@hookspec
def on_eval(model, ctx, report):
    """Evaluate the trained model and add metrics.

    :param model: the full model, in eval mode.
    :param ctx: the evaluation :class:`~normlab.context.Context`; ``ctx.run`` gives
        the configuration, data and ``ctx.run.domain(...)`` (which applies
        :func:`on_domain` around a block).
    :param report: a :class:`~normlab.evals.Report`; ``report.add(key, value)``
        with slash-separated keys (``clean/acc``).
    :return: ignored.

    Called for every plugin in run-file order, after the host's built-in
    evaluators (named under ``evaluate:`` in the run file).
    """
