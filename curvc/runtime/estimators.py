"""The curvature sources the runtime computes, as data: what each needs, what it yields,
the function that computes it, and what to tell the user when its input is missing.

``CurvatureSources`` (curvature_sources.py) and ``CurvOptimizer.step`` ask the entry
of their class (``source_of``) and branch on its properties (``needs_graph``,
``hooks_layers``, ...), never on a curvature's name: a new source is one entry here.

What a source can need:

* ``GRAPH``: gradients that carry their graph (``loss.backward(create_graph=True)``);
* ``LOSS``: the loss, handed to ``estimate_curvature(loss=...)`` (differentiated twice);
* ``LOGITS``: the model's logits on the batch, ``estimate_curvature(logits=...)``;
* ``GRADIENT``: the step's gradient alone (nothing from the training loop);
* ``LAYERS``: the model's layers, through hooks (the model given to the constructor);
* ``CLOSURE``: a closure that re-evaluates the loss, several times per step.

What it yields:

* ``ESTIMATE``: one tensor per parameter, the elementwise input the plan accumulates;
* ``PRECONDITIONED``: one tensor per parameter, the preconditioned gradient the plan
  then treats as its gradient;
* ``MATRIX``: one n x n matrix over all parameters (the dense structure), from which
  the runtime computes each parameter's preconditioned gradient for the plan;
* ``STEP``: the whole step itself (a driver that calls the closure).

``compute``'s signature follows the needs: ``(params, grads, args, keep_graph)`` for a
graph source (grads may hold None), ``(params, logits, args)`` for logits,
``(params, args)`` for the gradient alone, ``(opt, guard)`` for layer hooks (it returns
the statistics updates to commit once the step is accepted), ``(opt, closure)`` for a
closure driver. ``args`` are the plan's estimator arguments (or the dense settings).
Messages take ``{name}``, the optimizer class's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from curvc.runtime.program import resolved

GRAPH, LOSS, LOGITS, GRADIENT, LAYERS, CLOSURE = (
    "graph", "loss", "logits", "gradient", "layers", "closure")
ESTIMATE, PRECONDITIONED, MATRIX, STEP = "estimate", "preconditioned", "matrix", "step"
ROWS = "rows"  # per parameter, a stack of rows whose outer products sum to the estimate
TENSOR, LAYER, MODEL = "tensor", "layer", "model"  # what one computation spans


@dataclass(frozen=True)
class Source:
    kind: str  # the curvature's name in the language (curvc.language.FORMS["curvature"])
    scope: str  # TENSOR, LAYER or MODEL
    needs: tuple[str, ...]  # of GRAPH, LOSS, LOGITS, GRADIENT, LAYERS, CLOSURE
    yields: str  # ESTIMATE, PRECONDITIONED, MATRIX or STEP
    compute: Callable
    missing: str  # step() found no input on a step that needs one
    request: str  # estimate_curvature() was called without the input this source takes
    request_error: type = TypeError  # RuntimeError: estimate_curvature() is not for it
    tracker: Callable | None = None  # (model, wanted, params) -> hooks on its layers
    records: Callable | None = None  # opt -> whether the next step records statistics
    # a whole-model source's state, for checkpoint validation: key -> "vector" (n, all
    # parameters' elements), "vectors" (a list of them) or "matrix" (n x n)
    state: tuple[tuple[str, str], ...] = ()

    @property
    def needs_graph(self) -> bool:
        return GRAPH in self.needs

    @property
    def takes_loss(self) -> bool:
        return LOSS in self.needs

    @property
    def needs_logits(self) -> bool:
        return LOGITS in self.needs

    @property
    def hooks_layers(self) -> bool:
        return LAYERS in self.needs

    @property
    def needs_closure(self) -> bool:
        return CLOSURE in self.needs

    @property
    def asks_training_loop(self) -> bool:
        """Whether the training loop must hand something over on a refresh step
        (``wants_curvature()``): a graph, the loss or the logits."""
        return bool({GRAPH, LOSS, LOGITS} & set(self.needs))

    @property
    def estimated_on_request(self) -> bool:
        """Whether ``estimate_curvature(...)`` computes it."""
        return bool({LOSS, LOGITS} & set(self.needs))

    @property
    def drives_step(self) -> bool:
        return self.yields == STEP

    @property
    def is_matrix(self) -> bool:
        """Whether it yields one n x n matrix over all parameters (the dense structure)."""
        return self.yields == MATRIX

    @property
    def whole_model(self) -> bool:
        """Whether the step spans all parameters as one vector (one param group)."""
        return self.scope == MODEL

    def message(self, text: str, opt) -> str:
        return text.format(name=type(opt).__name__)


# --- the compute functions (each imports its module when first run) -----------

def _hutchinson(params, grads, args, keep_graph):
    from curvc.runtime import curvature
    return curvature.hutchinson(params, list(grads), int(args["samples"]), args["distribution"],
                                bool(args.get("spatial_average", False)), keep_graph=keep_graph)


def _hessian_diagonal(params, grads, args, keep_graph):
    from curvc.runtime import curvature
    return curvature.hessian_diagonal(params, list(grads))


def _gauss_newton_bartlett(params, logits, args):
    from curvc.runtime import curvature
    return curvature.gauss_newton_bartlett(params, logits, int(args["samples"]))


def _gradient_rows(per_example: bool):
    def compute(params, logits, args):
        from curvc.runtime import curvature
        return curvature.gradient_rows(params, logits, int(args["samples"]), per_example,
                                       float(args.get("scale", 1.0)))
    return compute


def _fisher_diagonal(params, logits, args):
    from curvc.runtime import curvature
    return curvature.fisher_diagonal(params, logits, int(args["samples"]))


def _kfac_natural_gradients(opt, guard):
    """This step's natural gradients into ``opt._estimates``; returns the statistics
    updates to commit once the step is accepted."""
    from curvc.runtime import kfac, zero
    partitioned = zero.all_params(opt)
    if opt._tracker is None:
        missing = LAYERS_MISSING if partitioned is None else zero.LAYERS_MISSING
        raise RuntimeError(missing.format(name=type(opt).__name__))
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        if p.grad is not None:
            opt._check_grad(p, p.grad)
    h = opt._flat_hypers(opt.param_groups[0])
    host = opt.host(resolved(h), opt._next_step())
    flags = host[1]
    args = opt._source_args(host)
    opt._estimates, updates = kfac.natural_gradients(
        opt, opt._tracker, params, beta=float(args["beta"]), damping=float(args["damping"]),
        accumulate=args["accumulate"] is None or flags[args["accumulate"]],
        invert=args["invert"] is None or flags[args["invert"]], grad_scale=guard.kfac_scale(),
        group=opt._curvature_group(), partitioned=partitioned,
        **{k: args[k] for k in ("iterate", "init", "bias_corrected", "exponent", "damping_after",
                                "floor", "sign", "weight", "start") if k in args})
    return updates


def _kfac_accumulates(opt) -> bool:
    """Whether the next step accumulates K-FAC statistics (asked by the layer tracker)."""
    h = opt._flat_hypers(opt.param_groups[0])
    host = opt.host(resolved(h), opt._next_step())
    flag = opt._source_args(host)["accumulate"]
    return flag is None or bool(host[1][flag])


def _layer_tracker(model, wanted, params):
    from curvc.runtime.kfac import LayerTracker
    return LayerTracker(model, wanted=wanted, params=params)


def _dense_hessian(params, grads, args, keep_graph):
    from curvc.runtime import dense
    return dense.hessian(params, list(grads))


def _dense_fisher(params, logits, args):
    from curvc.runtime import curvature
    return curvature.fisher_matrix(params, logits, int(args["samples"]))


def _empirical_fisher_matrix(params, args):
    from curvc.runtime.secant import flat_grad
    g = flat_grad(params).detach()
    return torch.outer(g, g)


def _secant_step(opt, closure):
    from curvc.runtime import amp
    return amp.secant_step(opt, closure,
                           opt.PROGRAM.source.args(opt._flat_hypers(opt.param_groups[0])))


# --- the messages --------------------------------------------------------------

LOGITS_MISSING = (
    "{name} refreshes its curvature on this step and needs the model's logits: before "
    "loss.backward(), call `if opt.wants_curvature(): opt.estimate_curvature(logits=logits)` "
    "(or pass step(curvature=[...]))")
SECOND_DERIVATIVES_MISSING = (
    "{name} estimates the Hessian diagonal on this step and needs second derivatives: call "
    "loss.backward(create_graph=opt.wants_curvature()) before step(), or "
    "opt.estimate_curvature(loss=loss), or pass step(curvature=[...])")
HESSIAN_MISSING = (
    "{name} needs the Hessian on this step: call "
    "loss.backward(create_graph=opt.wants_curvature()) before step(), or "
    "opt.estimate_curvature(loss=loss), or pass step(curvature=H)")
LAYERS_MISSING = (
    "{name} needs the model's layers: construct it with the model ({name}(model, ...)) or "
    "call opt.track(model) before the first step")
LAYERS_REQUEST = (
    "{name} gathers its statistics through hooks on the model's layers: pass the model to "
    "the constructor or call opt.track(model) once; estimate_curvature() is not needed")
NOTHING_TO_REQUEST = ("{name} estimates no curvature; estimate_curvature() is for optimizers "
                      "with an estimator")
NO_LAYERS = "{name} does not track layers; track() is for K-FAC optimizers"


# --- the registry ----------------------------------------------------------------

# Sources whose result the plan reads as an elementwise input (Plan.estimator's kind).
_PLAN_INPUTS = (
    Source("hutchinson", TENSOR, (GRAPH, LOSS), ESTIMATE, _hutchinson,
           SECOND_DERIVATIVES_MISSING,
           "{name}.estimate_curvature(loss=...) needs the loss whose Hessian diagonal it "
           "estimates"),
    Source("hessian", TENSOR, (GRAPH, LOSS), ESTIMATE, _hessian_diagonal,
           SECOND_DERIVATIVES_MISSING,
           "{name}.estimate_curvature(loss=...) needs the loss whose Hessian diagonal it "
           "computes"),
    Source("gauss_newton_bartlett", TENSOR, (LOGITS,), ESTIMATE, _gauss_newton_bartlett,
           LOGITS_MISSING, LOGITS_MISSING),
    Source("fisher", TENSOR, (LOGITS,), ESTIMATE, _fisher_diagonal, LOGITS_MISSING,
           LOGITS_MISSING),
    # the statistic of Kronecker factors (structure kronecker): sampled gradients as rows
    Source("fisher_rows", TENSOR, (LOGITS,), ROWS, _gradient_rows(True), LOGITS_MISSING,
           LOGITS_MISSING),
    Source("gauss_newton_bartlett_rows", TENSOR, (LOGITS,), ROWS, _gradient_rows(False),
           LOGITS_MISSING, LOGITS_MISSING),
    Source("kfac", LAYER, (LAYERS,), PRECONDITIONED, _kfac_natural_gradients, LAYERS_MISSING,
           LAYERS_REQUEST, RuntimeError, tracker=_layer_tracker, records=_kfac_accumulates),
)

_MATRIX_STATE = (("curvature", "matrix"),)  # curvc.runtime.dense's accumulated matrix

# Sources of a step over all parameters as one vector: the dense structure's matrix
# (DenseStage.curvature) and the secant method's closure driver.
_WHOLE_MODEL = (
    Source("hessian", MODEL, (GRAPH, LOSS), MATRIX, _dense_hessian, HESSIAN_MISSING,
           "{name}.estimate_curvature() needs loss=... for its hessian curvature",
           state=_MATRIX_STATE),
    Source("fisher", MODEL, (LOGITS,), MATRIX, _dense_fisher, LOGITS_MISSING,
           "{name}.estimate_curvature() needs logits=... for its fisher curvature",
           state=_MATRIX_STATE),
    Source("empirical_fisher", MODEL, (GRADIENT,), MATRIX, _empirical_fisher_matrix,
           HESSIAN_MISSING,  # unreachable: the gradient is always there on a step
           "{name} builds its curvature from the step's gradient; estimate_curvature() is not "
           "needed", RuntimeError, state=_MATRIX_STATE),
    # torch.optim.LBFGS's keys (curvc.runtime.secant keeps them with the first tensor)
    Source("secant", MODEL, (CLOSURE,), STEP, _secant_step, "",
           NOTHING_TO_REQUEST, RuntimeError,
           state=(("d", "vector"), ("prev_flat_grad", "vector"), ("old_dirs", "vectors"),
                  ("old_stps", "vectors"))),
)

# Every source, by what a program's source node names: (kind, scope). A curvature has
# one entry per scope it is computed over (the Fisher's diagonal and its dense matrix).
SOURCES: dict[tuple[str, str], Source] = {(s.kind, s.scope): s
                                          for s in (*_PLAN_INPUTS, *_WHOLE_MODEL)}


def source_of(cls: type) -> Source | None:
    """The curvature source of an optimizer class (None: the gradient alone,
    elementwise), found once per class from its program's source node."""
    if "_curvature_source" not in cls.__dict__:
        node = cls.PROGRAM.source if cls.PROGRAM is not None else None
        cls._curvature_source = None if node is None else SOURCES[node.kind, node.scope]
    return cls._curvature_source
