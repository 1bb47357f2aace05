"""``CurvOptimizer``: the torch.optim.Optimizer every generated class extends.

A generated module supplies the optimizer-specific parts as class
attributes (its hyperparameters, buffers, the rendered ``host`` and
``update`` functions, and optionally Triton kernels). This base class does
the bookkeeping torch users rely on, identically for every spec:

* param groups with per-group hyperparameters, ``state_dict`` /
  ``load_state_dict``, ``zero_grad``, ``step(closure)``, hooks and LR
  schedulers (all from ``torch.optim.Optimizer``);
* lazy state: ``state[p]['step']`` (a float32 CPU tensor, as in torch) and
  one tensor per buffer, allocated the first time ``p`` has a gradient;
* buckets: the tensors of a group that share device, dtype and step count
  are updated together, with host scalars computed once per bucket;
* global reductions (a norm over all parameters) before the update, kept on
  the device (no ``.item()`` in ``step``).
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from curvc.constraints import CONSTRAINTS
from curvc.runtime import amp

_TORCH_COMPAT = ("foreach", "fused", "capturable", "differentiable")

@dataclass
class Bucket:
    """Tensors of one group sharing (device, dtype, step): one launch's worth."""

    device: torch.device
    dtype: torch.dtype
    step: float
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    steps: list = field(default_factory=list)  # the per-parameter step counters to bump
    tensors: dict = field(default_factory=dict)  # buffer or input name -> list (None if absent)

    def args(self, names):
        """Per-tensor argument lists, in ``names`` order (param and grad included)."""
        cols = [self.params if n == "param" else self.grads if n == "grad" else self.tensors[n]
                for n in names]
        return list(zip(*cols))


class CurvOptimizer(torch.optim.Optimizer):
    """Base of every curvc-compiled optimizer. Not used directly."""

    # Filled in by the generated subclass.
    HYPERS: tuple = ()  # (name, default)
    VALIDATORS: tuple = ()  # (hyper, index, constraint, where)
    BUFFERS: tuple = ()  # (name, allocated-while flag or None, init(h) -> float)
    INPUTS: tuple = ()  # elementwise inputs a runtime estimator provides
    ESTIMATOR: tuple | None = None  # (kind, input, flag or None, args(h) -> dict)
    REDUCTIONS: tuple = ()  # names, in order
    STORES: tuple = ()  # the tensors a step writes ('param' and buffers)
    ELEMENTWISE: bool = True  # False: the plan has matrix stages (update gets the state dict)
    secant: Callable | None = None  # h -> settings, for a quasi-Newton (secant) plan
    dense: Callable | None = None  # h -> settings, for a dense-curvature plan
    host: Callable = None
    torch_update: Callable = None
    foreach_update: Callable | None = None
    torch_reduce: dict = {}
    UPDATE_ARGS: dict = {}
    REDUCE_ARGS: dict = {}
    triton_step: Callable | None = None
    triton_reduce: Callable | None = None
    # GradScaler hands grad_scale/found_inf to step() instead of unscaling (curvc.runtime.amp).
    _step_supports_amp_scaling = True

    def _construct(self, params, defaults: dict) -> None:
        """What a generated ``__init__`` calls (through ``self``, the one name its body
        reads besides its arguments, so no hyperparameter's name can shadow it)."""
        CurvOptimizer.__init__(self, params, defaults)

    def __init__(self, params, defaults: dict):
        model = None
        if isinstance(params, torch.nn.Module) and self._estimator_kind() == "kfac":
            model, params = params, params.parameters()  # K-FAC hooks the model's layers
        choice = defaults.get("state_dtype")
        if not (choice is None or choice == "param" or isinstance(choice, torch.dtype)):
            raise ValueError(f"Invalid state_dtype: {choice!r} (None, 'param' or a torch.dtype)")
        for key in ("capturable", "differentiable"):
            if defaults.get(key):
                raise ValueError(f"{type(self).__name__} does not support {key}=True; "
                                 f"curvc-compiled optimizers run outside CUDA graphs and autograd")
        self._validate(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate(group)
        amp.validate(self, defaults)
        if self.secant is not None or self.dense is not None:
            self._check_secant_groups()
        self._estimates: dict = {}
        self._tracker = None
        if model is not None:
            self.track(model)

    @classmethod
    def _estimator_kind(cls) -> str | None:
        return cls.ESTIMATOR[0] if cls.ESTIMATOR is not None else None

    def track(self, model: torch.nn.Module) -> None:
        """Hook ``model``'s layers so that K-FAC sees their inputs and output gradients.

        Called by the constructor when it is given the model itself
        (``KFAC(model, lr=...)``); call it after ``load_state_dict`` on a new model.
        """
        if self._estimator_kind() != "kfac":
            raise RuntimeError(f"{type(self).__name__} does not track layers; track() is for "
                               "K-FAC optimizers")
        from curvc.runtime.kfac import LayerTracker
        if self._tracker is not None:
            self._tracker.remove()
        # Weakly: the model's hooks must not keep this optimizer alive.
        self._tracker = LayerTracker(model, wanted=weakref.WeakMethod(self._kfac_accumulates))

    def _kfac_accumulates(self) -> bool:
        """Whether the next step accumulates K-FAC statistics (asked by the tracker)."""
        h = self._flat_hypers(self.param_groups[0])
        flag = self.ESTIMATOR[3](h)["accumulate"]
        return flag is None or bool(self.host(h, self._next_step())[1][flag])

    def close(self) -> None:
        """Remove the hooks this optimizer put on the model (K-FAC's layer tracker).

        They also go when the optimizer is garbage-collected; ``close()`` (or a
        ``with`` block) removes them now. A K-FAC optimizer needs ``track(model)``
        before it steps again. A no-op for optimizers without hooks.
        """
        tracker, self._tracker = getattr(self, "_tracker", None), None
        if tracker is not None:
            tracker.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_secant_groups(self) -> None:
        name = type(self).__name__
        if len(self.param_groups) != 1:
            raise ValueError(f"{name} doesn't support per-parameter options (parameter groups): "
                             "its curvature spans all parameters as one vector")
        group = self.param_groups[0]
        if self.dense is not None:
            return
        if group.get("maximize"):
            raise ValueError(f"{name} does not support maximize=True: negate the loss the "
                             "closure returns instead")
        if group.get("line_search_fn") not in (None, "strong_wolfe"):
            raise ValueError(f"Invalid line_search_fn: {group['line_search_fn']!r} "
                             "(None or 'strong_wolfe')")
        max_eval = group.get("max_eval")
        if max_eval is not None and not (float(max_eval).is_integer() and max_eval >= 1):
            raise ValueError(f"Invalid max_eval: {max_eval!r} (a positive whole number or None)")

    # -- hyperparameters -------------------------------------------------------

    def _validate(self, hypers: dict) -> None:
        for name, index, constraint, where in self.VALIDATORS:
            if name not in hypers:
                continue
            value = hypers[name]
            if index is not None:
                try:
                    value = value[index]
                except (TypeError, IndexError):
                    raise ValueError(f"Invalid {name}: {hypers[name]!r} (expected a tuple with "
                                     f"an entry at index {index})") from None
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"Invalid {name}: a tensor must have one element")
                value = value.item()
            label, ok = CONSTRAINTS[constraint]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not _finite_number(value) or not ok(value):
                at = "" if index is None else f" at index {index}"
                raise ValueError(f"Invalid {name} parameter{at}: {value!r} "
                                 f"({where} must be {label})")

    def _flat_hypers(self, group: dict) -> dict:
        h = {"maximize": bool(group.get("maximize", False))}
        for name, default in self.HYPERS:
            value = group[name]
            if isinstance(default, tuple):
                for i, v in enumerate(value):
                    h[f"{name}_{i}"] = _number(v)
            else:
                h[name] = _number(value)
        return h

    def __setstate__(self, state):
        super().__setstate__(state)
        # A copy or an unpickled optimizer: torch's __getstate__ keeps only the state and
        # the groups; a K-FAC copy needs track(model) (hooks belong to one optimizer).
        self.__dict__.setdefault("_estimates", {})
        self.__dict__.setdefault("_tracker", None)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("nonfinite", self.defaults.setdefault("nonfinite", "propagate"))
            for key in _TORCH_COMPAT:
                group.setdefault(key, None if key in ("foreach", "fused") else False)

    # -- state -------------------------------------------------------------------

    def _state_dtype(self, p: torch.Tensor, group: dict) -> torch.dtype:
        """float32 state for low-precision parameters unless the group asks otherwise."""
        choice = group.get("state_dtype")
        if choice is None:
            return torch.promote_types(p.dtype, torch.float32)
        if choice == "param":
            return p.dtype
        return choice

    @property
    def BUFFER_NAMES(self) -> tuple[str, ...]:
        names = type(self).__dict__.get("_buffer_names")
        if names is None:
            names = type(self)._buffer_names = tuple(n for n, _, _ in self.BUFFERS)
        return names

    def _init_state(self, p: torch.Tensor, group: dict, h: dict, flags: dict) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for name, when, init in self.BUFFERS:
            if name not in state and (when is None or flags[when]):
                state[name] = torch.full_like(p, init(h), dtype=self._state_dtype(p, group),
                                              memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state keeps the dtype it was saved with (fp32 state of bf16
        params), and every step counter becomes a float32 CPU scalar tensor, whatever
        form it was saved in (an int from old checkpoints, a CUDA tensor from
        torch's fused or capturable optimizers). A tensor whose shape does not fit its
        parameter (a checkpoint of another model) is refused first, with nothing loaded."""
        from curvc.runtime import state_shapes
        state_shapes.check(self, state_dict)
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            step = self.state[p].get("step")
            if step is not None and not (isinstance(step, torch.Tensor) and step.is_cpu
                                         and step.dtype == torch.float32 and step.dim() == 0):
                self.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)
            for key, value in saved[pid].items():
                if key != "step" and isinstance(value, torch.Tensor) and \
                        self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)

    # -- the step ------------------------------------------------------------------

    def _buckets(self, group: dict) -> list[tuple[Bucket, dict, dict]]:
        """Group this param group's tensors into buckets, creating state as needed.

        Everything that can fail is checked before any state changes, so an
        error leaves the optimizer exactly as it was.
        """
        h = self._flat_hypers(group)
        per_step: dict[float, tuple[dict, dict]] = {}
        todo = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            self._check_grad(p, g)
            state = self.state.get(p, {})
            step = float(state["step"]) + 1.0 if "step" in state else 1.0
            if step not in per_step:
                per_step[step] = self.host(h, step)
            flags = per_step[step][1]
            inputs = [self._input(n, p, flags) for n in self.INPUTS]
            todo.append((p, g, step, flags, inputs))
        buckets: dict[tuple, Bucket] = {}
        names = self.BUFFER_NAMES
        for p, g, step, flags, inputs in todo:
            state = self._init_state(p, group, h, flags)
            key = (p.device, p.dtype, step)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(p.device, p.dtype, step, tensors={
                    n: [] for n in (*names, *self.INPUTS, "state")})
            b.params.append(p)
            b.grads.append(g)
            b.steps.append(state["step"])
            for n in names:
                b.tensors[n].append(state.get(n))
            for n, t in zip(self.INPUTS, inputs):
                b.tensors[n].append(t)
            b.tensors["state"].append(state)  # matrix stages keep their factors there
        return [(b, *per_step[b.step]) for b in buckets.values()]

    def _check_grad(self, p: torch.Tensor, g: torch.Tensor) -> None:
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                               f"use torch.optim.SparseAdam or dense gradients")
        if torch.is_complex(p) or torch.is_complex(g):
            raise RuntimeError(f"{type(self).__name__} does not support complex parameters; "
                               f"optimize torch.view_as_real(p) instead")

    def _input(self, name: str, p: torch.Tensor, flags: dict) -> torch.Tensor | None:
        kind, _, when, _ = self.ESTIMATOR
        if when is not None and not flags[when]:
            return None  # not read on this step
        est = self._estimates.get(p)
        if est is None:
            raise RuntimeError(self._missing_estimate_message(kind))
        return est

    # -- curvature estimators (curvc.runtime.curvature) ---------------------------

    def _next_step(self) -> float:
        for group in self.param_groups:
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    return float(self.state[p]["step"]) + 1.0
        return 1.0

    def wants_curvature(self) -> bool:
        """Whether the next ``step()`` refreshes the curvature estimate.

        On those steps the optimizer needs what its estimator needs: gradients
        with a graph (``loss.backward(create_graph=True)``) for Hutchinson, or
        ``estimate_curvature(logits=...)`` for Gauss-Newton-Bartlett.
        """
        if self.dense is not None:
            settings = self.dense(self._flat_hypers(self.param_groups[0]))
            return settings["curvature"] != "empirical_fisher" and \
                self._dense_refresh(self._next_step(), settings)
        if self.ESTIMATOR is None or self._estimator_kind() == "kfac":
            return False  # K-FAC's hooks need nothing from the training loop
        when = self.ESTIMATOR[2]
        if when is None:
            return True
        flags = self.host(self._flat_hypers(self.param_groups[0]), self._next_step())[1]
        return bool(flags[when])

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def estimate_curvature(self, logits: torch.Tensor | None = None,
                           loss: torch.Tensor | None = None) -> None:
        """Compute this step's curvature estimate now; ``step()`` then uses it.

        Gauss-Newton-Bartlett (Sophia-G) takes the model's ``logits`` on the
        batch, before ``loss.backward()`` frees their graph. Hutchinson
        (AdaHessian, Sophia-H) takes the ``loss`` (it differentiates twice
        itself, so no ``create_graph`` is needed on ``backward``).
        """
        from curvc.runtime import curvature
        if self.dense is not None:
            self._estimate_dense(logits, loss)
            return
        if self.ESTIMATOR is None:
            raise RuntimeError(f"{type(self).__name__} estimates no curvature; "
                               "estimate_curvature() is for optimizers with an estimator")
        kind, _, _, make_args = self.ESTIMATOR
        if kind == "kfac":
            raise RuntimeError(f"{type(self).__name__} gathers its statistics through hooks on "
                               "the model's layers: pass the model to the constructor or call "
                               "opt.track(model) once; estimate_curvature() is not needed")
        args = make_args(self._flat_hypers(self.param_groups[0]))
        params = self._trainable()
        with torch.enable_grad():
            if kind in ("gauss_newton_bartlett", "fisher"):
                if logits is None:
                    raise TypeError(self._missing_estimate_message(kind))
                est = curvature.ESTIMATORS[kind](params, logits, int(args["samples"]))
            else:
                if loss is None:
                    raise TypeError(f"{type(self).__name__}.estimate_curvature(loss=...) needs "
                                    "the loss whose Hessian diagonal it estimates")
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                # A parameter the loss does not reach (None) has a zero Hessian row too.
                est = curvature.hutchinson(params, list(grads), int(args["samples"]),
                                           args["distribution"],
                                           bool(args.get("spatial_average", False)),
                                           keep_graph=True)  # the user's backward follows
        self._estimates = {p: e.detach() for p, e in zip(params, est)}

    def set_curvature(self, estimates) -> None:
        """Hand ``step()`` this step's curvature estimate: one tensor per parameter, in
        ``param_groups`` order (None for parameters without one)."""
        params = [p for g in self.param_groups for p in g["params"]]
        estimates = list(estimates)
        if len(estimates) != len(params):
            raise ValueError(f"set_curvature() got {len(estimates)} tensors for "
                             f"{len(params)} parameters")
        for p, e in zip(params, estimates):
            if e is not None and e.shape != p.shape:
                raise ValueError(f"a curvature estimate of shape {tuple(e.shape)} for a "
                                 f"parameter of shape {tuple(p.shape)}")
        self._estimates = {p: e.detach() for p, e in zip(params, estimates) if e is not None}

    def _dense_refresh(self, step: float, settings: dict) -> bool:
        flag = settings["refresh"]
        return flag is None or self.host(self._flat_hypers(self.param_groups[0]), step)[1][flag]

    def _dense_step(self, closure, curvature):
        from curvc.runtime import dense
        loss = None
        guard = amp.StepGuard(self)
        if closure is not None:
            if guard.scaled:
                raise RuntimeError("a closure re-evaluates the gradients after GradScaler "
                                   "checked them: call scaler.step(opt) without one")
            with torch.enable_grad():
                loss = closure()
        params = self.param_groups[0]["params"]
        if all(p.grad is None for p in params):
            self._release_graphs()  # torch.optim's rule: no gradients, no step
            self._estimates = {}
            return loss
        try:
            guard.unscale_grads()  # before g g^T; raise mode: a non-finite gradient stops here
            for p in params:
                if p.grad is not None:
                    self._check_grad(p, p.grad)
            settings = self.dense(self._flat_hypers(self.param_groups[0]))
            refresh = self._dense_refresh(self._next_step(), settings)
            matrix = None
            if curvature is not None:
                matrix = torch.as_tensor(curvature)
                n = sum(p.numel() for p in params)
                if matrix.shape != (n, n):
                    raise ValueError(f"step(curvature=...) of {type(self).__name__} takes one "
                                     f"{n} x {n} matrix, got shape {tuple(matrix.shape)}")
            elif refresh and settings["curvature"] == "empirical_fisher":
                g = dense.flat_grad(params).detach()
                matrix = torch.outer(g, g)
            elif refresh:
                matrix = self._estimates.get("dense")
                if matrix is None and settings["curvature"] == "fisher":
                    raise RuntimeError(self._missing_estimate_message("fisher"))
                if matrix is None and any(p.grad is not None and p.grad.grad_fn is not None
                                          for p in params):  # constant ones: zero rows
                    with torch.enable_grad():
                        matrix = dense.hessian(params, [p.grad for p in params]).detach()
                    matrix, = guard.unscale_from_graph([matrix])  # rows of a scaled gradient
                if matrix is None:
                    raise RuntimeError(
                        f"{type(self).__name__} needs the Hessian on this step: call "
                        "loss.backward(create_graph=opt.wants_curvature()) before step(), or "
                        "opt.estimate_curvature(loss=loss), or pass step(curvature=H)")
            guard.check([("the curvature matrix", "value", matrix)])
        finally:
            self._release_graphs()
            self._estimates = {}
        if guard.skips_on_host():  # the matrix and the counters stay as they were
            for p in params:
                if p.grad is not None:
                    p.grad = p.grad.detach()
            guard.count_skip(params)
            return loss
        for p in params:
            if p.grad is not None:
                p.grad = p.grad.detach()
        dense.step(self, settings, refresh, matrix)
        return loss

    def _natural_gradients(self, guard: amp.StepGuard) -> list:
        """K-FAC: this step's natural gradients as the plan's input; returns the
        statistics updates to commit once the step is accepted."""
        from curvc.runtime import kfac
        if self._tracker is None:
            raise RuntimeError(f"{type(self).__name__} needs the model's layers: construct it "
                               f"with the model ({type(self).__name__}(model, ...)) or call "
                               "opt.track(model) before the first step")
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            if p.grad is not None:
                self._check_grad(p, p.grad)
        h = self._flat_hypers(self.param_groups[0])
        flags = self.host(h, self._next_step())[1]
        args = self.ESTIMATOR[3](h)
        self._estimates, updates = kfac.natural_gradients(
            self, self._tracker, params, beta=float(args["beta"]), damping=float(args["damping"]),
            accumulate=args["accumulate"] is None or flags[args["accumulate"]],
            invert=args["invert"] is None or flags[args["invert"]], grad_scale=guard.kfac_scale())
        return updates

    def _estimate_from_graph(self, guard: amp.StepGuard) -> None:
        """Hutchinson from gradients that carry their graph (backward(create_graph=True))."""
        from curvc.runtime import curvature
        pairs = [(p, p.grad) for p in self._trainable() if p.grad is not None]
        if all(g.grad_fn is None for _, g in pairs):
            return  # no graph at all: backward() ran without create_graph
        args = self.ESTIMATOR[3](self._flat_hypers(self.param_groups[0]))
        with torch.enable_grad():
            est = curvature.hutchinson([p for p, _ in pairs], [g for _, g in pairs],
                                       int(args["samples"]), args["distribution"],
                                       bool(args.get("spatial_average", False)))
        est = guard.unscale_from_graph([e.detach() for e in est])  # z Hz of a scaled loss
        self._estimates = {p: e for (p, _), e in zip(pairs, est)}

    def _estimate_dense(self, logits, loss) -> None:
        """The dense structure's matrix for this step: the Hessian from ``loss``, or
        the Fisher from ``logits``."""
        from curvc.runtime import curvature, dense
        settings = self.dense(self._flat_hypers(self.param_groups[0]))
        params = self.param_groups[0]["params"]
        kind = settings["curvature"]
        with torch.enable_grad():
            if kind == "hessian" and loss is not None:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                matrix = dense.hessian(params, grads)
            elif kind == "fisher" and logits is not None:
                matrix = curvature.fisher_matrix(params, logits, int(settings["samples"]))
            else:
                wanted = "loss=" if kind == "hessian" else "logits="
                raise TypeError(f"{type(self).__name__}.estimate_curvature() needs {wanted}... "
                                f"for its {kind} curvature")
        self._estimates = {"dense": matrix.detach()}

    def _missing_estimate_message(self, kind: str) -> str:
        name = type(self).__name__
        if kind in ("gauss_newton_bartlett", "fisher"):
            return (f"{name} refreshes its curvature on this step and needs the model's logits: "
                    f"before loss.backward(), call `if opt.wants_curvature(): "
                    f"opt.estimate_curvature(logits=logits)` (or pass step(curvature=[...]))")
        return (f"{name} estimates the Hessian diagonal on this step and needs second "
                f"derivatives: call loss.backward(create_graph=opt.wants_curvature()) before "
                f"step(), or opt.estimate_curvature(loss=loss), or pass step(curvature=[...])")

    def _release_graphs(self) -> None:
        """Drop gradients' graphs after use: p.grad -> graph -> p is a reference cycle
        that would keep every step's graph alive."""
        for p in self._trainable():
            if p.grad is not None and p.grad.grad_fn is not None:
                p.grad = p.grad.detach()

    def _uses_triton(self, bucket: Bucket, group: dict) -> bool:
        """Backend 'triton' runs Triton everywhere (CPU tensors need TRITON_INTERPRET=1);
        'auto' runs it on CUDA tensors and the torch rendering elsewhere."""
        if self.triton_step is None or group.get("fused") is False:
            return False
        return self.BACKEND == "triton" or bucket.device.type == "cuda"

    def _fused(self, group: dict, bucket: Bucket) -> bool:
        """fused=True: one compiled pass per tensor; None: so when the bucket is large."""
        if not self.ELEMENTWISE:
            return False  # matrix stages: torch's own kernels, one tensor at a time
        fused = group.get("fused")
        return bool(fused) or (fused is None and _large(bucket))

    @torch.no_grad()
    def step(self, closure=None, *, curvature=None):
        """Performs a single optimization step.

        ``closure`` re-evaluates the loss; ``curvature`` (optional) is this step's
        curvature estimate, one tensor per parameter (see ``set_curvature``).
        """
        if torch.compiler.is_compiling():
            # Under torch.compile the step runs outside dynamo (a graph break), through
            # curvc's own fused or eager paths: traced, it would guard on every float
            # hyperparameter and recompile whenever a scheduler moves lr.
            return torch.compiler.disable(CurvOptimizer.step)(self, closure, curvature=curvature)
        if self.secant is not None:
            settings = self.secant(self._flat_hypers(self.param_groups[0]))
            return amp.secant_step(self, closure, settings)
        if self.dense is not None:
            return self._dense_step(closure, curvature)
        loss = None
        guard = amp.StepGuard(self)
        if closure is not None:
            if guard.scaled:
                raise RuntimeError("a closure re-evaluates the gradients after GradScaler "
                                   "checked them: call scaler.step(opt) without one")
            with torch.enable_grad():
                loss = closure()
        if curvature is not None:
            self.set_curvature(curvature)
        kfac_updates = ()
        skip = False
        try:
            guard.unscale_grads()  # raise mode: a non-finite gradient stops here
            if self._estimator_kind() == "kfac" and curvature is None:
                skip = guard.skips_on_host()  # K-FAC's statistics: decided before they are built
                kfac_updates = () if skip else self._natural_gradients(guard)
            elif self.ESTIMATOR is not None and not self._estimates and self.wants_curvature():
                if self.ESTIMATOR[0] == "hutchinson":
                    self._estimate_from_graph(guard)
                if not self._estimates:  # refuse before any state changes
                    raise RuntimeError(self._missing_estimate_message(self.ESTIMATOR[0]))
            guard.check([(self._index(p), "curvature estimate", e)
                         for p, e in self._estimates.items()])
            kfac = self._estimator_kind() == "kfac" and curvature is None  # decided on the host
            # Kronecker factors and K-FAC statistics live outside the plan: the host decides.
            skip = skip or ((kfac or not self.ELEMENTWISE) and guard.skips_on_host())
            work = [] if skip else [(group, *item) for group in self.param_groups
                                    for item in self._buckets(group)]
        finally:
            if self.ESTIMATOR is not None:
                self._release_graphs()
        if skip:
            guard.count_skip(self._trainable())
            self._estimates = {}
            if self._tracker is not None and curvature is None:
                self._tracker.clear()  # the skipped batch's statistics go with it
            return loss
        for p, key, value in kfac_updates:  # the step was accepted: commit the statistics
            self.state[p][key] = value
        if self._tracker is not None and curvature is None:
            self._tracker.clear()  # consumed: the next step gathers its own
        reduced = self._reduce(work) if self.REDUCTIONS else {}
        guard.inject(work, reduced, device_side=self.ELEMENTWISE and not kfac)
        for group, bucket, scalars, flags in work:
            red = reduced.get(bucket.device, {})
            if self._uses_triton(bucket, group):
                self.triton_step(bucket, scalars, flags, red)
                torch._foreach_add_(bucket.steps, 1.0)  # host-side counters, one call
            else:
                self._torch_step(group, bucket, scalars, flags, red)
        guard.finish(work)
        self._estimates = {}
        return loss

    def _index(self, p: torch.Tensor) -> int:
        """``p``'s position over all param groups (what an error names)."""
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"])
                    if q is p)

    def _torch_step(self, group: dict, bucket: Bucket, scalars: dict, flags: dict,
                    reduced: dict) -> None:
        spec = self.UPDATE_ARGS
        rows = bucket.args(spec["tensors"])
        if self._fused(group, bucket) and _plain_dense_cpu(rows):
            if self._fused_step(rows, bucket.steps, scalars, flags, reduced):
                return  # the compiled pass bumped the step counters
        torch._foreach_add_(bucket.steps, 1.0)
        args = _arguments(spec, scalars, reduced, flags)
        update = type(self).torch_update
        if type(self).foreach_update is None or not _all_plain(rows):
            # Subclasses (DTensor) take per-tensor ops: their foreach coverage varies.
            for tensors in rows:
                update(*tensors, *args)
            return
        # Eager: foreach ops over cache-sized pieces. The step is elementwise, so
        # any split of the tensors is valid; small pieces keep every temporary
        # the DAG allocates in cache instead of fresh pages per op. Tensors that
        # fit in one piece go whole (foreach ops take any shape and strides; a
        # view or a slice per tensor would cost more than a small tensor's update),
        # except 0-d ones, kept 1-D as everywhere else (type promotion differs).
        foreach = type(self).foreach_update
        pieces, size = [], 0
        for row in rows:
            n = row[0].numel()
            if n <= _PIECE and row[0].dim():
                split = [row]
            elif all(t is None or t.is_contiguous() for t in row):
                flat = [None if t is None else t.view(-1) for t in row]
                split = [[None if t is None else t[start:start + _PIECE] for t in flat]
                         for start in range(0, max(n, 1), _PIECE)]
            else:
                update(*row, *args)
                continue
            for piece in split:
                pieces.append(piece)
                size += min(_PIECE, n)
                if size >= _BATCH:
                    foreach(*(list(c) for c in zip(*pieces)), *args)
                    pieces, size = [], 0
        if pieces:
            foreach(*(list(c) for c in zip(*pieces)), *args)

    def _fused_step(self, rows, steps: list, scalars: dict, flags: dict, reduced: dict) -> bool:
        """The bucket's step through the compiled kernel; False if it cannot be compiled."""
        from curvc.runtime.fused_cpu import FusedUpdate
        spec = self.UPDATE_ARGS
        names = spec["scalars"] + [f"reduced_{n}" for n in spec["reduced"]]
        present = tuple(t is not None for t in rows[0])
        dtypes = tuple(t.dtype for t in rows[0] if t is not None)
        sdtype = torch.promote_types(rows[0][0].dtype, torch.float32)
        fl = tuple((n, flags[n]) for n in spec["flags"])
        cache = type(self).__dict__.get("_fused_kernels")
        if cache is None:
            cache = type(self)._fused_kernels = {}
        key = (present, dtypes, fl)
        if key not in cache:
            try:
                cache[key] = FusedUpdate(type(self).torch_update, spec["tensors"], present,
                                         names, dict(fl), dtypes, sdtype)
            except Exception as e:  # no C++ compiler, an inductor bug, ...: stay correct
                warnings.warn(f"{type(self).__name__}: the fused CPU step could not be compiled "
                              f"({type(e).__name__}: {e}); using the eager torch path")
                cache[key] = None
        kernel = cache[key]
        if kernel is None:
            return False
        unread = [] if flags.get(amp.NONFINITE_FLAG) else [amp.NONFINITE_VALUE]
        if [n for n in spec["reduced"] if n not in unread]:
            # device values: keep them on the device, no .item()
            values = [torch.tensor([scalars[n] for n in spec["scalars"]], dtype=sdtype)]
            values += [reduced[n].reshape(1).to(sdtype) for n in spec["reduced"]]
            s = torch.cat(values)
        else:  # the skip value is unread with its flag off
            s = kernel.set_scalars([scalars[n] for n in spec["scalars"]]
                                   + [0.0] * len(spec["reduced"]))
        # One call per tensor, small ones too: a call costs microseconds, less than
        # gathering small tensors into one buffer and scattering them back.
        if not all(c.dtype == torch.float32 and c.dim() == 0 and c.is_cpu for c in steps):
            return False  # a counter loaded in another form: the eager path bumps it
        for row, count in zip(rows, steps):
            kernel([t if t.dim() == 1 else t.view(-1) for t in row if t is not None], s, count)
        return True

    def _reduce(self, work) -> dict:
        """Global sums over every parameter of every group, one per device, on device."""
        totals: dict[str, torch.Tensor] = {}
        for group, bucket, scalars, flags in work:
            if self._uses_triton(bucket, group):
                partial = self.triton_reduce(bucket, scalars, flags)
            else:
                partial = {}
                for name in self.REDUCTIONS:
                    spec = self.REDUCE_ARGS[name]
                    args = _arguments(spec, scalars, {}, flags)
                    fn = self.torch_reduce[name]
                    partial[name] = sum(fn(*t, *args).double() for t in bucket.args(spec["tensors"]))
            for name, value in partial.items():
                value = value.double()
                totals[name] = value if name not in totals else totals[name] + value.to(totals[name].device)
        devices = {b.device for _, b, _, _ in work}
        return {d: {n: v.to(d, non_blocking=True) for n, v in totals.items()} for d in devices}


def _arguments(spec: dict, scalars: dict, reduced: dict, flags: dict) -> list:
    """A generated function's arguments after its tensors, in its signature's order
    (positional: the rendered parameter names are the backend's, not the plan's)."""
    return ([scalars[n] for n in spec["scalars"]] + [reduced[n] for n in spec["reduced"]]
            + [flags[n] for n in spec["flags"]])


def _finite_number(v) -> bool:
    """Not NaN, and not an int too large for a float (math.isnan(10**400) raises)."""
    try:
        return not math.isnan(v)
    except OverflowError:
        return False


def _number(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


_LARGE = 1 << 18  # elements in a bucket from which the fused (compiled) CPU path pays off
_PIECE = 1 << 15  # eager path: elements per foreach list entry
_BATCH = 1 << 18  # eager path: elements per foreach call


def _plain_dense_cpu(rows) -> bool:
    """Whether a bucket may take the compiled CPU kernel, whose raw call checks nothing:
    plain tensors (no subclass such as DTensor) in contiguous strided CPU memory (not
    meta: no memory at all), every row with the first row's dtypes and buffers."""
    layout = [None if t is None else t.dtype for t in rows[0]]
    for row in rows:
        for t, dtype in zip(row, layout):
            if t is None or dtype is None:
                if t is not dtype:
                    return False
                continue
            if type(t) not in _PLAIN or t.dtype != dtype or t.device.type != "cpu" or \
                    t.layout != torch.strided or not t.is_contiguous():
                return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _all_plain(rows) -> bool:
    return all(t is None or type(t) in _PLAIN for row in rows for t in row)


def _large(bucket: Bucket) -> bool:
    return sum(p.numel() for p in bucket.params) >= _LARGE
