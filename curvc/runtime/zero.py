"""Compiled optimizers as ZeroRedundancyOptimizer's local optimizer (ZeRO stage 1).

``torch.distributed.optim.ZeroRedundancyOptimizer`` partitions the parameters over the
ranks of its process group, each tensor to one rank (largest first, to the rank with
the fewest elements so far), and builds one *local optimizer* per rank by calling
``optimizer_class(that rank's param groups, **defaults)`` from its method
``_init_local_optimizer``; its ``step`` steps the local optimizer and broadcasts each
tensor from its owner. Under DDP every rank still holds every parameter and its
(averaged) gradient. What that means for each kind of compiled optimizer:

* a per-tensor step from the gradient alone (Adam, Shampoo, Muon, ...): each rank steps
  its own tensors, the same step one process takes on them;
* K-FAC: its layers' hooks need the model, which ZeRO does not hand over, so call
  ``zero.optim.track(model)`` once after constructing. Every rank hooks every layer and
  computes every layer's batch factors (A_t, S_t), since each rank's own data must enter
  every layer's average; they are averaged over the group in the one bucketed all-reduce
  DDP uses (``curvc.runtime.distributed.average``), and the running factors, their
  inverses and the step are kept only for the layers a rank owns a tensor of. A layer
  whose weight and bias fall to different ranks is kept by both (each part of its step
  needs the whole layer's factors), in the state of the tensor each owns;
* the dense structure (one n x n matrix over all parameters) and L-BFGS (one flat
  history over all parameters) have no meaning on a subset of the tensors: refused at
  construction (``refuse``), DDP being the alternative;
* a per-tensor curvature estimate (Sophia's, AdaHessian's; ``zero.optim.
  estimate_curvature(...)``, as ZeRO does not pass it on): every rank estimates every
  tensor of the ZeRO (one Hessian-vector product costs the same over all of them as over
  a part; Hutchinson's probes drawn for all of them in one order, as one process draws
  them), the estimates are averaged over the group in one bucketed all-reduce that every
  rank enters with the same tensors in the same order, and each rank keeps its own
  tensors' (``CurvatureSources._estimated``, ``_averaged``). With ``curvature_group=
  False`` each rank estimates its own tensors only, from its own data.

A GradScaler: ZeRO is marked ``_step_supports_amp_scaling`` (``adopt``), so
``scaler.step(zero)`` sets its scale and ``found_inf`` on ZeRO instead of unscaling its
gradients; the local optimizer reads them there (``scaler_inputs``) and unscales every
rank's gradients and the estimates of the scaled backward pass itself (K-FAC's output
gradients carry the scale squared), as it does stepped by the scaler directly.

A rank that owns no tensor (more ranks than tensors) would never count a step, and so
disagree with the others on which steps refresh: refused at construction where the
curvature is averaged.
"""
from __future__ import annotations

import sys
import weakref

from curvc.errors import CurvError
from curvc.runtime import estimators

_ZERO_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"

# What a whole-model source's one object spans, by what it yields (estimators.Source)
_WHOLE = {estimators.MATRIX: "dense structure (one curvature matrix over all parameters)",
          estimators.STEP: "low_rank structure (L-BFGS: one flat history over all "
                           "parameters)"}

LAYERS_MISSING = (
    "{name} under ZeroRedundancyOptimizer needs the model's layers, which ZeRO does not "
    "pass to its local optimizer: call zero.optim.track(model) once after constructing "
    "the ZeroRedundancyOptimizer, on every rank")


def building():
    """The ZeroRedundancyOptimizer constructing the optimizer being built, or None: the
    ``self`` of a method frame on the constructor's stack (``_init_local_optimizer``, or
    a subclass's override of it). Nothing is imported: without ZeRO's module loaded, no
    ZeRO can be building anything."""
    module = sys.modules.get(_ZERO_MODULE)
    if module is None:
        return None
    cls = module.ZeroRedundancyOptimizer
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, cls):
                return owner
        frame = frame.f_back
    return None


def adopt(opt, source) -> None:
    """What ``CurvOptimizer.__init__`` does when ZeRO builds it: refuse a step over all
    parameters; remember the ZeRO (weakly: it owns this optimizer) and average curvature
    over its process group by default."""
    owner = building()
    if owner is None:
        return
    if source is not None and source.whole_model:
        refuse(type(opt).__name__, source)
    if source is not None and getattr(opt, "_group_choice", None) is not False:
        empty = [r for r, groups in enumerate(owner._partition_parameters())
                 if not any(g["params"] for g in groups)]
        if empty:  # decided alike on every rank: every rank sees the whole partition
            raise ValueError(
                f"{type(opt).__name__} under ZeroRedundancyOptimizer: rank(s) {empty} own no "
                "parameter (more ranks than tensors), whose step count then never moves, "
                "but every rank must enter each refresh's average of the curvature; use "
                "fewer ranks or DistributedDataParallel alone")
    opt.__dict__["_zero"] = weakref.ref(owner)
    # A GradScaler then hands ZeRO its scale and found_inf (as to a compiled optimizer) and
    # does not unscale ZeRO's gradients itself: the local optimizer reads both from ZeRO
    # (``scaler_inputs``) and unscales its own tensors and the estimates of the scaled
    # backward pass (K-FAC's output gradients carry the scale squared), which a scaler
    # unscaling the gradients behind the local optimizer's back would leave scaled.
    owner._step_supports_amp_scaling = True
    if getattr(opt, "_group_choice", None) is None:
        opt._group_choice = owner.process_group


def refuse(name: str, source) -> None:
    what = _WHOLE.get(source.yields, "step over all parameters as one vector")
    raise CurvError("runtime.zero_partitioned", name=name, what=what)


def all_params(opt) -> list | None:
    """Every parameter of the ZeroRedundancyOptimizer ``opt`` is the local optimizer of
    (each rank's partition together), or None when ZeRO did not build ``opt``."""
    ref = opt.__dict__.get("_zero")
    owner = ref() if ref is not None else None
    if owner is None:
        return None
    return [p for g in owner.param_groups for p in g["params"]]


def scaler_inputs(opt):
    """What a GradScaler set for this step, (found_inf, grad_scale), on ``opt`` or, for
    ZeRO's local optimizer, on the ZeroRedundancyOptimizer it steps for."""
    ref = opt.__dict__.get("_zero")
    owner = ref() if ref is not None else None
    carrier = opt if owner is None or getattr(opt, "found_inf", None) is not None else owner
    return getattr(carrier, "found_inf", None), getattr(carrier, "grad_scale", None)
