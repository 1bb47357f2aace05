"""Non-finite gradients and ``torch.amp.GradScaler``: when a step is skipped, and unscaling.

Two things can make a step one to skip:

* the optimizer's ``nonfinite`` policy: ``"propagate"`` (torch.optim's behaviour:
  a NaN flows into the state), ``"skip"`` (the step leaves parameters and
  state as they were) or ``"raise"`` (a ValueError naming the parameter,
  before anything changes; it reads the values on the host, one sync);
* a GradScaler. Compiled optimizers set ``_step_supports_amp_scaling``, as
  torch's fused optimizers do, so ``scaler.step(opt)`` does not unscale the
  gradients itself nor sync: it sets ``opt.grad_scale`` (the scale, or None
  after ``scaler.unscale_(opt)``) and ``opt.found_inf`` (a 0-d device tensor)
  and calls ``opt.step()``, which unscales and skips the step when found_inf
  is set, whatever the policy. ZeroRedundancyOptimizer is marked the same way when it
  builds a compiled local optimizer, which then reads both from it (runtime/zero.py).

A skip is decided on the device where the plan is elementwise: the
``keep_on_nonfinite`` pass (curvc/passes.py) makes every store ``old if flagged
else new``, and the runtime passes the 0-d flag like a global reduction. The
per-parameter step counters then go back by the flag (on CPU tensors, free;
for CUDA parameters the counters live on the host, as in torch's
non-capturable optimizers, so the flag is copied to the host once per step,
after the update is queued). Steps whose state lives outside the elementwise
plan (Kronecker factors, K-FAC statistics, the dense matrix, L-BFGS's
history) read the flag on the host and skip the whole step. Skipped steps
are counted in ``state[p]["skipped_steps"]`` (a 0-d float32 tensor on the
parameter's device) whenever a step may be skipped.

Across ranks the decision is one: the flag is max-reduced over
``curvc.runtime.distributed.decision_groups`` (``opt.nonfinite_group``, by default
the default group whenever torch.distributed runs with 2+ ranks, and always the mesh
groups a DTensor parameter is sharded over), so a NaN in one rank's shard (FSDP2),
partition (ZeRO) or replica (DDP) skips the step on every rank, and in raise mode
every rank raises. Each check takes part in one all-reduce of a scalar whether or not
this rank has anything to check, so every rank makes the same collective calls.
Sharded tensors are checked and unscaled on their local shards.

Unscaling (a GradScaler with a known scale): the gradients are divided in
place (``torch._amp_foreach_non_finite_check_and_unscale_``, one op per
device and dtype, as the scaler does), and every estimate built from the
scaled backward pass by the right power of the scale: Hutchinson's z * Hz
and the dense Hessian (from the gradients' graph) by the scale, K-FAC's
output-gradient factor S by its square. Estimates the user hands over
(``estimate_curvature(loss=...)`` with the unscaled loss, ``logits=...``,
``set_curvature``) are taken as they are. After ``scaler.unscale_(opt)`` the
scale is not passed to the optimizer, so an estimate from the scaled graph
cannot be unscaled: that step is refused with a clear error.
"""
from __future__ import annotations

import math

import torch

from curvc.plan import NONFINITE_FLAG, NONFINITE_VALUE
from curvc.runtime import distributed, sharded, zero

MODES = ("propagate", "skip", "raise")


class NonFiniteStep(Exception):
    """Raised inside a watched closure (L-BFGS) to abandon the step."""


class StepGuard:
    """One step's non-finite policy and GradScaler inputs (see the module docstring)."""

    def __init__(self, opt):
        self.opt = opt
        self.mode = opt.defaults.get("nonfinite", "propagate")
        found, scale = zero.scaler_inputs(opt)  # set by GradScaler.step
        self.scaler_found = found
        self.scale = scale if found is not None else None
        self.active = self.mode != "propagate" or self.scaler_found is not None
        self._found: dict = {}  # device -> 0-d float32, nonzero where a value is not finite
        self._total = None
        # the ranks that decide together (one all-reduce of the flag per decision)
        self._groups = distributed.decision_groups(opt) if self.active else []

    @property
    def scaled(self) -> bool:
        return self.scaler_found is not None

    # -- gradients and estimates -----------------------------------------------------

    def params(self) -> list:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def unscale_grads(self) -> None:
        """Unscale the gradients in place (a known scale) and note where any is not finite.
        In raise mode, a non-finite gradient raises here, before anything changes."""
        if not self.active:
            return
        self._total = None
        named = [(i, p, _local(p.grad)) for i, p in enumerate(self.params())
                 if p.grad is not None
                 and not (p.grad.is_sparse or torch.is_complex(p.grad))]  # refused later
        if self.scale is not None:
            # ZeRO's local optimizer unscales every rank's gradients, as the scaler would
            # have: a K-FAC layer it steps may have its bias on another rank.
            partition = zero.all_params(self.opt)
            unscaled = named if partition is None else [
                (None, p, _local(p.grad)) for p in partition if p.grad is not None
                and not (p.grad.is_sparse or torch.is_complex(p.grad))]
            groups: dict = {}
            for _, p, g in unscaled:
                groups.setdefault((g.device, g.dtype), []).append(g)
            for (device, _), grads in groups.items():
                inv = self._inverse_scale(device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self._flag(device), inv)
        if self.scaled:
            for device in {g.device for _, _, g in named}:
                self._flag(device).add_(self.scaler_found.to(device, non_blocking=True))
            return  # the scaler's inf steps are skipped, not raised: it retries at a lower scale
        self.check([(i, "gradient", g) for i, _, g in named])

    def check(self, items) -> None:
        """Note non-finite values among ``items`` ((index, what, tensor) triples);
        in raise mode, raise naming the first."""
        if not self.active:
            return
        self._total = None  # decided again: every rank, whether or not it has items
        items = [(i, what, _local(t)) for i, what, t in items if t is not None]
        items = [(i, what, t) for i, what, t in items if t.numel()]
        if self.mode == "raise":
            self._raise_if_any(items)
            return
        if not items:
            return
        groups: dict = {}
        for _, _, t in items:
            groups.setdefault((t.device, t.dtype), []).append(t)
        for (device, _), tensors in groups.items():
            norms = torch._foreach_norm(tensors, ord=math.inf)
            bad = torch.logical_not(torch.isfinite(torch.stack(norms)).all())
            self._flag(device).add_(bad.to(torch.float32))

    def _raise_if_any(self, items) -> None:
        per_device: dict = {}  # one host read per device: raise mode's sync
        for n, (_, _, t) in enumerate(items):
            per_device.setdefault(t.device, []).append((n, torch.isfinite(t).all()))
        finite = [True] * len(items)
        for flags in per_device.values():
            for (n, _), ok in zip(flags, torch.stack([f for _, f in flags]).tolist()):
                finite[n] = ok
        elsewhere = False
        if self._groups:  # every rank raises, or none
            bad = torch.tensor(0.0 if all(finite) else 1.0)
            elsewhere = bool(distributed.agree(bad, self._groups).item())
        for (i, what, t), ok in zip(items, finite):
            if not ok:
                raise ValueError(f"{type(self.opt).__name__}: the {what} of {self._where(i)} "
                                 f"({_shape(t, i, self)}) has a non-finite value (nan or "
                                 "inf); nonfinite='raise' stopped the step before it changed "
                                 "anything")
        if elsewhere:
            raise ValueError(f"{type(self.opt).__name__}: another rank found a non-finite "
                             "value (nan or inf) in its gradients or curvature estimates (its "
                             "shard or partition of them); nonfinite='raise' stopped the step "
                             "on every rank before it changed anything")

    def _where(self, index) -> str:
        if isinstance(index, str):
            return index
        for gi, group in enumerate(self.opt.param_groups):
            if index < len(group["params"]):
                return f"param_groups[{gi}]['params'][{index}]"
            index -= len(group["params"])
        return "a parameter"

    def unscale_from_graph(self, tensors: list, power: int = 1) -> list:
        """Estimates built from the scaled backward pass, divided by scale ** power."""
        if not self.scaled:
            return tensors
        if self.scale is None:
            raise RuntimeError(
                f"{type(self.opt).__name__} builds its curvature from the scaled backward "
                "pass, and after scaler.unscale_(opt) the GradScaler does not tell the "
                "optimizer its scale: call scaler.step(opt) without unscale_() (the optimizer "
                "unscales the gradients itself), or, for Hutchinson, hand over the estimate "
                "from the unscaled loss with opt.estimate_curvature(loss=loss) before backward")
        return [None if t is None else t * self._inverse_scale(t.device).to(t.dtype) ** power
                for t in tensors]

    def kfac_scale(self) -> torch.Tensor | None:
        """The scale K-FAC's output gradients carry (None: unscaled)."""
        if not self.scaled:
            return None
        self.unscale_from_graph([], 2)  # refuses an unknown scale
        return self.scale

    def _inverse_scale(self, device) -> torch.Tensor:
        # As the scaler computes it: the reciprocal in float64, rounded to float32.
        return self.scale.double().reciprocal().float().to(device, non_blocking=True)

    def _device(self) -> torch.device:
        params = self.params()
        return params[0].device if params else torch.device("cpu")

    def _flag(self, device) -> torch.Tensor:
        self._total = None  # the flag is about to change
        device = torch.device(device)
        if device not in self._found:
            self._found[device] = torch.zeros((), dtype=torch.float32, device=device)
        return self._found[device]

    # -- the decision ------------------------------------------------------------------

    def total(self) -> torch.Tensor | None:
        """1.0 where any device found a non-finite value, else 0.0 (a 0-d device tensor)."""
        # raise mode decided in check() already (unless the scaler flagged the step)
        agreed = self._groups and (self.mode != "raise" or self.scaled)
        if self._total is None and (self._found or agreed):
            flags = list(self._found.values()) or [self._flag(self._device())]
            total = flags[0]
            for f in flags[1:]:
                total = total + f.to(total.device, non_blocking=True)
            self._total = distributed.agree((total > 0).to(torch.float32), self._groups)
        return self._total

    def skips_on_host(self) -> bool:
        """Whether to skip a step whose state lives outside the elementwise plan
        (reads the flag on the host: one sync, documented)."""
        total = self.total()
        return self.active and total is not None and bool(total.item())

    def count_skip(self, params) -> None:
        """A whole step skipped on the host: count it for every parameter with a gradient."""
        for p in params:
            if p.grad is not None:
                self._counter(p).add_(1.0)

    def _counter(self, p) -> torch.Tensor:
        state = self.opt.state[p]
        if "skipped_steps" not in state:
            state["skipped_steps"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return state["skipped_steps"]

    # -- the elementwise plan ------------------------------------------------------------

    def inject(self, work, reduced: dict, device_side: bool) -> dict:
        """Hand the plan its skip flag and value (``reduced``: device -> values)."""
        on = self.active and device_side and self.total() is not None
        total = self.total() if on else None
        for _, bucket, _, flags in work:
            flags[NONFINITE_FLAG] = on
            values = reduced.setdefault(bucket.device, {})
            values[NONFINITE_VALUE] = total.to(bucket.device, non_blocking=True) if on \
                else _zero(bucket.device)
        self._on = on
        return reduced

    def finish(self, work) -> None:
        """After the update: a skipped step's counters go back, and it is counted."""
        if not getattr(self, "_on", False):
            return
        total = self.total()
        host = None
        for _, bucket, _, _ in work:
            flag = total.to(bucket.device, non_blocking=True)
            if host is None:
                host = total if total.is_cpu else total.to("cpu")  # CUDA: one copy per step
            torch._foreach_sub_(bucket.steps, [host] * len(bucket.steps))
            params = [sh.param for sh in bucket.shards] if bucket.shards else bucket.params
            counters = [self._counter(p) for p in params]  # the DTensor's, not its shard's
            torch._foreach_add_(counters, [flag] * len(counters))


def _local(t):
    """A DTensor's local shard (checked and unscaled in place there); a tensor as it is."""
    return t._local_tensor if sharded.is_sharded(t) else t


def _shape(t, index, guard) -> str:
    """The shape an error names: the whole parameter's, for a shard."""
    if isinstance(index, int):
        params = guard.params()
        if index < len(params) and sharded.is_sharded(params[index]):
            return f"shape {tuple(params[index].shape)}, this rank's shard {tuple(t.shape)}"
    return f"shape {tuple(t.shape)}"


_ZEROS: dict = {}


def _zero(device) -> torch.Tensor:
    """The skip value of a step that is never skipped (one tensor per device, kept)."""
    z = _ZEROS.get(device)
    if z is None:
        z = _ZEROS[device] = torch.zeros((), dtype=torch.float64, device=device)
    return z


def validate(opt, defaults: dict) -> None:
    mode = defaults.get("nonfinite", "propagate")
    if mode not in MODES:
        raise ValueError(f"Invalid nonfinite: {mode!r} ('propagate', 'skip' or 'raise')")
    for group in opt.param_groups:
        if group.get("nonfinite", mode) != mode:
            raise ValueError("nonfinite is one policy for the whole optimizer (a skipped step "
                             "skips every parameter): set it in the constructor, not per group")


# -- L-BFGS: every closure evaluation checked, the step undone on a non-finite one -----

def secant_step(opt, closure, settings: dict):
    from curvc.runtime import secant
    guard = StepGuard(opt)
    if guard.scaled:
        raise RuntimeError(f"{type(opt).__name__} re-evaluates the loss and its gradients "
                           "through the closure several times per step, which GradScaler does "
                           "not support (torch.optim.LBFGS neither): train it without the scaler")
    if guard.mode == "propagate" or closure is None:
        return secant.step(opt, closure, settings)
    params = opt.param_groups[0]["params"]
    saved = _snapshot(opt, params)

    def watched():
        loss = closure()
        with torch.no_grad():
            items = [(i, "gradient", p.grad) for i, p in enumerate(params)]
            if isinstance(loss, torch.Tensor):
                items.insert(0, ("the loss", "value", loss.detach()))
            elif loss is not None and not math.isfinite(float(loss)):
                items.insert(0, ("the loss", "value", torch.tensor(float(loss))))
            check = StepGuard(opt)
            check.check(items)
            if guard.mode == "skip" and check.skips_on_host():
                raise NonFiniteStep(loss)
        return loss

    try:
        return secant.step(opt, watched, settings)
    except (NonFiniteStep, ValueError) as e:
        _restore(opt, params, saved)
        if isinstance(e, ValueError):
            raise
        guard.count_skip(params)
        return e.args[0]


def _snapshot(opt, params):
    """What an L-BFGS step may change: the parameters and the history (lists copied,
    tensors written in place cloned)."""
    state = opt.state[params[0]]
    kept = {k: list(v) if isinstance(v, list) else v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in state.items()}
    return [p.detach().clone() for p in params], kept, set(state)


def _restore(opt, params, saved) -> None:
    values, kept, keys = saved
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    state = opt.state[params[0]]
    for k in list(state):
        if k not in keys:
            del state[k]
    state.update(kept)
