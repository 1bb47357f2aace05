"""``CurvOptimizer``: the torch.optim.Optimizer every generated class extends.

A generated module supplies the optimizer-specific parts as class
attributes (its hyperparameters, buffers, the rendered ``host`` and its
``PROGRAM``: the kernels and matrix calls of its step, in the typed form of
``curvc.runtime.program``, which ``step`` runs in order). This base class does
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

Two mixins hold the rest: ``curvature_sources`` (estimators, K-FAC's hooks, the
dense matrix) and ``elementwise_step`` (running a bucket through Triton, the
fused CPU kernel or the foreach functions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from curvc.cache import PicklesByModuleText
from curvc.constraints import CONSTRAINTS
from curvc.plan import SHAPE
from curvc.runtime import amp, sharded, zero
from curvc.runtime.curvature_sources import CurvatureSources
from curvc.runtime.elementwise_step import ElementwiseSteps
from curvc.runtime.program import Program, Runner, resolved

_TORCH_COMPAT = ("foreach", "fused", "capturable", "differentiable")

@dataclass
class Bucket:
    """Tensors of one group sharing (device, dtype, step): one launch's worth."""

    device: torch.device
    dtype: torch.dtype
    step: float
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    keys: list = field(default_factory=list)  # the parameters as state keys them (not sharded)
    steps: list = field(default_factory=list)  # the per-parameter step counters to bump
    tensors: dict = field(default_factory=dict)  # buffer or input name -> list (None if absent)
    shards: list | None = None  # DTensor parameters: where each local shard sits (sharded.py)

    def columns(self, names) -> list[list]:
        """One list per role, in ``names`` order (param and grad included): a foreach
        function's tensor arguments. The bucket's own lists, which callees only read."""
        return [self.params if n == "param" else self.grads if n == "grad" else self.tensors[n]
                for n in names]

    def args(self, names):
        """Per-tensor argument lists, in ``names`` order (param and grad included)."""
        return list(zip(*self.columns(names)))


class CurvOptimizer(PicklesByModuleText, CurvatureSources, ElementwiseSteps,
                   torch.optim.Optimizer):
    """Base of every curvc-compiled optimizer. Not used directly."""

    # Filled in by the generated subclass.
    HYPERS: tuple = ()  # program.Hyper
    WORDS: dict = {}  # a word hyperparameter's name -> the strings it may be (None: default)
    FALLBACKS: dict = {}  # name -> (other, index): None reads the other's value (or entry)
    # `hyper NAME = none`: None (not given) reaches the host as NaN, which only the host's
    # given(NAME) reads (check refuses any other read of it)
    OPTIONAL: tuple = ()
    VALIDATORS: tuple = ()  # program.Validator
    BUFFERS: tuple = ()  # program.Buffer
    host: Callable = None
    SHAPED = False  # host values read the tensor's shape (plan.SHAPE): computed per shape
    PROGRAM: Program | None = None  # its curvature source, kernels and matrix calls
    # An extern with a batched form (program.Extern.many) runs one torch call per group of
    # same-shaped tensors (runtime.batched); False on an instance: one call per tensor.
    batch_externs = True
    # The ranks a non-finite step's skip (or raise) is decided over (runtime.distributed.
    # decision_groups): None, the default group when torch.distributed runs; False, none
    # (a DTensor's shards still decide together); or a ProcessGroup. Not a hyperparameter:
    # a checkpoint carries no ProcessGroup.
    nonfinite_group = None
    # GradScaler hands grad_scale/found_inf to step() instead of unscaling (curvc.runtime.amp).
    _step_supports_amp_scaling = True

    def _construct(self, params, defaults: dict) -> None:
        """What a generated ``__init__`` calls (through ``self``, the one name its body
        reads besides its arguments, so no hyperparameter's name can shadow it)."""
        CurvOptimizer.__init__(self, params, defaults)

    def __init__(self, params, defaults: dict):
        model = None
        if isinstance(params, torch.nn.Module):  # any optimizer takes the model itself;
            model, params = params, params.parameters()  # K-FAC also hooks its layers
        choice = defaults.get("state_dtype")
        if not (choice is None or choice == "param" or isinstance(choice, torch.dtype)):
            raise ValueError(f"Invalid state_dtype: {choice!r} (None, 'param' or a torch.dtype)")
        for key in ("capturable", "differentiable"):
            if defaults.get(key):
                raise ValueError(f"{type(self).__name__} does not support {key}=True; "
                                 f"curvc-compiled optimizers run outside CUDA graphs and autograd")
        self._validate(defaults)
        # The ranks to average curvature over: kept off the param groups (a ProcessGroup
        # is no hyperparameter, and a checkpoint must not carry one).
        self._group_choice = defaults.pop("curvature_group", None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate(group)
        amp.validate(self, defaults)
        source = self._source()
        zero.adopt(self, source)  # built by ZeroRedundancyOptimizer: a partition of the tensors
        if source is not None and source.whole_model:
            self._check_whole_model_groups(source)
        self._estimates: dict = {}
        self._tracker = None
        if model is not None and source is not None and source.hooks_layers:
            self.track(model)

    def _check_whole_model_groups(self, source) -> None:
        name = type(self).__name__
        if len(self.param_groups) != 1:
            raise ValueError(f"{name} doesn't support per-parameter options (parameter groups): "
                             "its curvature spans all parameters as one vector")
        group = self.param_groups[0]
        if not source.needs_closure:
            return  # the rest are the closure driver's (torch.optim.LBFGS's) options
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
        for name in self.OPTIONAL:
            value = _number(hypers.get(name))
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not _finite_number(value) or math.isinf(value)):
                raise ValueError(f"Invalid {name}: {value!r} (a finite number, or None: "
                                 "not given)")
        for name, choices in self.WORDS.items():
            if name in hypers and hypers[name] is not None and hypers[name] not in choices:
                raise ValueError(f"Invalid {name}: {hypers[name]!r} (one of "
                                 f"{', '.join(map(repr, choices))}, or None for the default)")
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
            if value is None and (name in self.FALLBACKS or self._machine_eps(name, index)):
                continue  # another's value (validated as that one), or the dtype's eps
            label, ok = CONSTRAINTS[constraint]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not _finite_number(value) or not ok(value):
                at = "" if index is None else f" at index {index}"
                raise ValueError(f"Invalid {name} parameter{at}: {value!r} "
                                 f"({where} must be {label})")

    def _machine_eps(self, name: str, index: int | None) -> bool:
        """Whether the spec's default there is ``machine_eps`` (None in the signature)."""
        default = dict(self.HYPERS).get(name)
        if index is not None:
            default = default[index] if isinstance(default, tuple) else 0.0
        return default is None

    @property
    def matrix_split(self) -> bool | str:
        """How matrix work is shared over the ranks. True (the default): under FSDP2 each
        matrix block is computed by one owner rank and broadcast (runtime.sharded), and
        under DDP so are a layer-statistics source's per-layer operators; "step": that
        source's per-layer preconditioned steps too; False: every rank computes
        everything."""
        return self.__dict__.get("_matrix_split", True)

    @matrix_split.setter
    def matrix_split(self, value) -> None:
        if value is not True and value is not False and value != "step":
            raise ValueError(f"matrix_split must be True, False or 'step', not {value!r}")
        self.__dict__["_matrix_split"] = value

    def _flat_hypers(self, group: dict) -> dict:
        h = {"maximize": bool(group.get("maximize", False))}
        if self.SHAPED:  # set per tensor by _buckets; NaN wherever a host value is read without
            h.update(dict.fromkeys(SHAPE, math.nan))
        for hyper in self.HYPERS:
            name, default, value = hyper.name, hyper.default, group[hyper.name]
            if name in self.OPTIONAL:
                h[name] = math.nan if value is None else float(_number(value))
                continue
            if value is None and name in self.FALLBACKS:
                other, index = self.FALLBACKS[name]
                value = group[other] if index is None else group[other][index]
            if name in self.WORDS:  # a word reaches the host as its index (None: the default)
                h[name] = float(self.WORDS[name].index(default if value is None else value))
            elif isinstance(default, tuple):
                for i, v in enumerate(value):
                    h[f"{name}_{i}"] = _number(v)
            else:
                h[name] = _number(value)
        return h

    def __getstate__(self):
        # torch keeps the state and the groups; the instance's plain settings go too (a
        # ProcessGroup choice stays behind: it belongs to this process's group)
        state = super().__getstate__()
        settings = {k: v for k, v in self.__dict__.items() if k in _CARRIED
                    and (v is None or isinstance(v, (bool, str)))}
        return {**state, "curvc_settings": settings}

    def __setstate__(self, state):
        settings = state.pop("curvc_settings", {})
        super().__setstate__(state)
        self.__dict__.update(settings)
        # A copy or an unpickled optimizer: torch's __getstate__ keeps only the state and
        # the groups; a K-FAC copy needs track(model) (hooks belong to one optimizer).
        self.__dict__.setdefault("_estimates", {})
        self.__dict__.setdefault("_tracker", None)
        self.__dict__.setdefault("_group_choice", None)
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
        per_step: dict[tuple, tuple[dict, dict]] = {}
        todo = []
        states, shaped = self.state, self.SHAPED
        reads_input = self._reads_input()
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or p.is_complex() or g.is_complex():
                self._check_grad(p, g)  # raises, naming the case
            state = states.get(p)
            step = float(state["step"]) + 1.0 if state and "step" in state else 1.0
            # machine_eps resolves per dtype; Muon's lr adjustment per matrix shape, ndim per order
            at = (step, p.dtype, *_matrix_shape(p), float(p.dim())) if shaped \
                else (step, p.dtype)
            host = per_step.get(at)
            if host is None:
                host = per_step[at] = self.host(
                    {**resolved(h, p.dtype), **dict(zip(SHAPE, at[2:]))}, step)
            if reads_input:
                self._check_input(p, host[1])  # run.source hands it to the kernels
            todo.append((p, g, at))
        buckets: dict[tuple, Bucket] = {}
        names = self.BUFFER_NAMES
        # DTensor's module, if anything imported it: otherwise no tensor is sharded
        dtensors = sharded.loaded()
        for p, g, at in todo:
            state = self._init_state(p, group, h, per_step[at][1])
            key = (p.device, at, sharded.layout(p) if dtensors else None)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(p.device, p.dtype, at[0], tensors={
                    n: [] for n in (*names, "state")})
            b.params.append(p)
            b.grads.append(g)
            b.keys.append(p)
            b.steps.append(state["step"])
            tensors = b.tensors
            for n in names:
                tensors[n].append(state.get(n))
            tensors["state"].append(state)  # matrix stages keep their factors there
        if dtensors:
            for b in buckets.values():
                sharded.localize(b)  # FSDP2: the step runs on each rank's local shard
        return [(b, *per_step[key[1]]) for key, b in buckets.items()]

    def _check_grad(self, p: torch.Tensor, g: torch.Tensor) -> None:
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                               f"use torch.optim.SparseAdam or dense gradients")
        if torch.is_complex(p) or torch.is_complex(g):
            raise RuntimeError(f"{type(self).__name__} does not support complex parameters; "
                               f"optimize torch.view_as_real(p) instead")

    def _reads_input(self) -> bool:
        """Whether the program's source hands the kernels a curvature input (on some steps)."""
        node = self.PROGRAM.source
        return node is not None and node.output is not None

    def _check_input(self, p: torch.Tensor, flags: dict) -> None:
        """Refuses a step on which the program reads ``p``'s curvature and has none (only
        called where ``_reads_input``)."""
        when = self.PROGRAM.source.when
        if when is not None and not flags[when]:
            return
        if p not in self._estimates:
            raise RuntimeError(self._missing_input())

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
        source = self._source()
        if source is not None and source.drives_step:  # a closure driver (the secant method)
            return source.compute(self, closure)
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
        host_statistics = self._decided_on_host(curvature)  # layer statistics, a matrix
        try:
            guard.unscale_grads()  # raise mode: a non-finite gradient stops here
            skip = host_statistics and guard.skips_on_host()  # decided before they are built
            updates = () if skip else self._estimate_before_step(guard, curvature)
            if guard.active and not skip:  # positions (for an error message): only when checked
                index = self._positions()
                guard.check([(index[p], "curvature estimate", e)
                             for p, e in self._estimates.items()])
            # Kronecker factors and layer statistics live outside the kernels: the host decides.
            outside = host_statistics or self.PROGRAM.keeps_state_outside_kernels
            skip = skip or (outside and guard.skips_on_host())
            work = [] if skip else [(group, *item) for group in self.param_groups
                                    for item in self._buckets(group)]
        finally:
            if source is not None:
                self._release_graphs()
        if skip:
            guard.count_skip(self._trainable())
            self._estimates = {}
            if self._tracker is not None and curvature is None:
                self._tracker.clear()  # the skipped batch's statistics go with it
            return loss
        for p, key, value in updates:  # the step was accepted: commit the statistics
            self.state[p][key] = value
        if self._tracker is not None and curvature is None:
            self._tracker.clear()  # consumed: the next step gathers its own
        base = guard.inject(work, {}, device_side=not outside)
        self.PROGRAM.run(Runner(self, work, base))  # the generated step: kernels and externs
        guard.finish(work)
        self._estimates = {}
        return loss

    def _positions(self) -> dict:
        """Each parameter's position over all param groups (what an error names)."""
        return {q: i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}


# what a copy or a pickle of an optimizer carries besides torch's state and groups
_CARRIED = ("_matrix_split", "batch_externs", "nonfinite_group", "_group_choice")


def _matrix_shape(p: torch.Tensor) -> tuple[float, float]:
    """(rows, cols) of a tensor as a matrix: a vector is 1 x n, an order-k tensor
    shape[0] x the rest; an empty dimension counts as 1 (its step is empty anyway)."""
    if p.dim() < 2:
        return 1.0, float(max(p.numel(), 1))
    return float(max(p.shape[0], 1)), float(max(math.prod(p.shape[1:]), 1))


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
