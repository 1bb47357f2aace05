"""K-FAC (Martens & Grosse, 2015): per layer, the Fisher block as a Kronecker product.

For an ``nn.Linear`` layer s = W x + b over N rows (the batch, or batch x
sequence), with a = [x, 1] (the 1 when the layer has a bias) and ds the
gradient of the loss at the layer's output,

    A = a^T a / N                 (in+1) x (in+1)
    S = N ds^T ds                 out x out

(ds of a mean-reduced loss carries a 1/N, so S is the mean outer product of
the per-row output gradients). An ``nn.Conv2d`` layer is the same with a row
per (example, output position), a its im2col patch and S scaled by the batch
(Grosse & Martens, 2016; ``kfac_layers`` says which rows and why). A layer
applied several times in one forward pass (weight sharing) sums the (A, S) of
its calls, as curvlinops' KFAC does. The factors are accumulated by the plan's
iterate (``Settings``; K-FAC's own is the EMA ``A <- beta A + (1 - beta) A_t``
from the identity) on its
``accumulate`` steps; each factor's operator f(F) is recomputed on its
``invert`` steps, f(lambda) = 1 / max((lambda + damping)^e + damping_after, floor) of its
eigenvalues (e = 1: the damped inverse, by Cholesky). The layer's step is

    [dW db] = f(S) [gW gb] f(A)      ((S + damping I)^-1 G (A + damping I)^-1 for K-FAC)

(a convolution's gW reshaped to out x (in kh kw)), or, for eigen_sign,
Q_S [f(s_i) f(a_j) sign((Q_S^T G Q_A)_ij)] Q_A^T; the
elementwise plan then treats it as its gradient (a normalized length, weight
decay, momentum and the learning rate follow, as in the usual K-FAC training
loop). Tensors outside a tracked layer keep their plain gradient (an identity
block); a convolution K-FAC cannot precondition is refused.

The factors and operators live in the weight's optimizer state (``kfac_A``,
``kfac_S``, ``kfac_A_inv``, ``kfac_S_inv``; ``kfac_A_basis``, ``kfac_S_basis``
for eigen_sign; ``kfac_count`` for a bias correction), so checkpoints carry them.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import torch

from curvc.runtime import distributed, kfac_layers
from curvc.runtime.matrix import SIGN_SLACK
from curvc.runtime.roots import at_rounding, damped_symmetric, inverse_root, spectral


class LayerTracker:
    """Hooks on a model's ``nn.Linear`` and ``nn.Conv2d`` layers: per layer, the sums of
    the factors (A_t, S_t) of every call since the last step.

    A layer applied c times per forward pass adds the factors of each call,
    each normalised by its own rows (curvlinops' KFAC sums them the same way):
    A_t = sum_c a_c^T a_c / R_c, S_t = sum_c T_c ds_c^T ds_c (``kfac_layers``). A call counts
    once its output gradient arrives, so a forward pass nothing differentiates
    (an evaluation with grad enabled) adds nothing. ``wanted`` (a weak
    reference to a callable, e.g. a ``weakref.WeakMethod``; None: always) says
    whether the next step accumulates statistics; it is asked once per step,
    at the first forward pass, so steps that do not accumulate cost no matrix
    products.

    A convolution K-FAC cannot precondition (``kfac_layers.refusal``) whose weight is
    in ``params`` (None: any weight that requires grad) is refused here, naming it;
    ``refuse`` checks again at each step (a param group added later).

    The hooks hold the tracker weakly, and are removed when it is collected
    (with the optimizer that owns it) or on ``remove()``.
    """

    def __init__(self, model: torch.nn.Module, wanted=None, params=None):
        self.layers: list[torch.nn.Module] = [m for m in model.modules()
                                              if kfac_layers.tracked(m)]
        self._refused = {m: f"the layer {name!r} ({m}): {why}" for name, m in
                         model.named_modules() if (why := kfac_layers.refusal(m)) is not None}
        self.refuse(params if params is not None else
                    [p for p in model.parameters() if p.requires_grad])
        self._sums: dict = weakref.WeakKeyDictionary()  # module -> (A_t, S_t)
        self._wanted = wanted
        self._recording: bool | None = None  # asked of ``wanted`` at the first forward
        me = weakref.ref(self)  # the model must not keep the tracker (or its optimizer) alive

        def forward(module, args, output):
            tracker = me()
            if tracker is not None:
                tracker._forward(module, args, output)
        handles = [m.register_forward_hook(forward) for m in self.layers]
        self._finalizer = weakref.finalize(self, _remove_hooks, handles)

    def _forward(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.requires_grad):
            return  # an evaluation pass: nothing will be differentiated
        if self._recording is None:
            wanted = self._wanted() if self._wanted is not None else None
            self._recording = wanted is None or bool(wanted())
        if not self._recording:
            return
        x, me = args[0].detach(), weakref.ref(self)

        def on_grad(grad):
            tracker = me()
            if tracker is not None:
                tracker._add(module, x, grad.detach())
        output.register_hook(on_grad)

    def refuse(self, params) -> None:
        """Raise ValueError if a layer K-FAC cannot precondition has its weight in
        ``params`` (it would silently take the plain gradient)."""
        ids = {id(p) for p in params}
        for module, what in self._refused.items():
            if id(module.weight) in ids:
                raise ValueError(f"K-FAC cannot precondition {what}; freeze it or give its "
                                 "parameters to another optimizer")

    def _add(self, module: torch.nn.Module, x: torch.Tensor, ds: torch.Tensor) -> None:
        dtype = module.weight.dtype
        a_t, s_t = kfac_layers.layer_factors(module, x.to(dtype), ds.to(dtype))
        old = self._sums.get(module)
        # the sums are the tracker's own, so a later call adds in place
        self._sums[module] = (a_t, s_t) if old is None else (old[0].add_(a_t), old[1].add_(s_t))

    def factors(self, module: torch.nn.Module):
        """(A_t, S_t) summed over the layer's calls since the last step, or None."""
        return self._sums.get(module)

    def clear(self) -> None:
        """A step used the statistics: the next one gathers its own."""
        self._sums = weakref.WeakKeyDictionary()
        self._recording = None

    def remove(self) -> None:
        self._finalizer()


def _remove_hooks(handles) -> None:
    for h in handles:
        h.remove()


@dataclass(frozen=True)
class Settings:
    """How the plan accumulates, damps and roots each factor (its estimator arguments).

    ``iterate``: ``ema`` (from the identity, or from zero and divided by
    ``1 - beta^n`` when ``bias_corrected``), ``sum`` (from ``init * I``) or
    ``instant`` (the last accumulated batch's factor). ``weight``: this batch's weight
    in the EMA when it is not 1 - beta, and ``start``: the multiple of I it starts from
    when the plan says (``iterate ema_or_sum``: the sum from 0 at beta = 1, weight 1).
    Each factor F then
    becomes ``f(F)`` with f(lambda) = 1 / max((lambda + damping)^exponent +
    damping_after, floor) (``roots.spectral``: 0 for a non-positive eigenvalue without
    damping after or floor, the pseudo-inverse);
    ``sign``: the step is taken in the factors' eigenbases (eigen_sign).
    """

    beta: float = 0.0
    damping: float = 0.0
    iterate: str = "ema"
    init: float = 0.0
    bias_corrected: bool = False
    exponent: float = 1.0
    damping_after: float = 0.0
    floor: float = 0.0
    sign: bool = False
    weight: float | None = None
    start: float | None = None


def _accumulated(old: torch.Tensor | None, new: torch.Tensor, st: Settings) -> torch.Tensor:
    """The factor after one more batch's ``new``, by the plan's iterate rule."""
    if st.iterate == "instant":
        return new
    if old is None:  # the start: I (K-FAC's EMA), init * I (a sum), 0 (a debiased EMA)
        old = torch.eye(new.shape[0], dtype=new.dtype, device=new.device) * _start(st)
    if st.iterate == "sum":
        return old + new
    # one new tensor, not three (the batch's ``new`` may be the tracker's, kept for a retry)
    return old.mul(st.beta).add_(new, alpha=1.0 - st.beta if st.weight is None else st.weight)


def _eigen(factor: torch.Tensor, st: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(lambda), Q) of the factor damped inside, in float64 (as ``inverse_root``)."""
    w, q = torch.linalg.eigh(damped_symmetric(factor, st.damping, torch.float64))
    return spectral(at_rounding(w, st.damping, _start(st)), st.exponent, st.damping_after,
                    st.floor), q


def _start(st: Settings) -> float:
    """The multiple of I a factor starts from (``_accumulated``): an instant factor has
    none, so it can be singular (``roots.at_rounding``)."""
    if st.iterate == "instant":
        return 0.0
    start = 0.0 if st.bias_corrected else (st.init if st.iterate == "sum" else 1.0)
    return start if st.start is None else st.start


def factor_operator(factor: torch.Tensor, st: Settings) -> torch.Tensor:
    """What the step multiplies a factor's side by: f(F) = Q f(Lambda) Q^T, or (sign)
    the eigenbasis with each column scaled by f(lambda), Q diag(f(lambda))."""
    if not (st.sign or st.damping_after or st.floor):  # (F + damping I)^-exponent, Cholesky for 1
        return inverse_root(factor, st.exponent, st.damping, _start(st))
    f, q = _eigen(factor, st)
    return (q * f).to(factor.dtype) if st.sign else ((q * f) @ q.T).to(factor.dtype)


def preconditioned(g: torch.Tensor, s_op: torch.Tensor, a_op: torch.Tensor,
                   sign: bool) -> torch.Tensor:
    """One layer's step from its gradient G (out x in, with the bias column).

    f(S) G f(A); with ``sign``: Q_S [f(lambda_S,i) f(lambda_A,j) sign((Q_S^T G Q_A)_ij)]
    Q_A^T, from the scaled bases B = Q diag(f): B_S sign(B_S^T G B_A) B_A^T is the same,
    as a positive column scale does not change a sign and a zero f zeroes its column.
    """
    g = g.to(s_op.dtype)
    if sign:
        return s_op @ _sign_above_rounding(s_op.T @ g @ a_op, g, s_op, a_op) @ a_op.T
    return s_op @ g @ a_op


def _sign_above_rounding(c: torch.Tensor, g: torch.Tensor, s_op: torch.Tensor,
                         a_op: torch.Tensor) -> torch.Tensor:
    """sign(c), 0 where |c_ij| is within rounding of zero.

    G has no component along a direction its layer's statistics never saw (the
    null space of a a^T, or of ds ds^T), so there c_ij is rounding noise, and its
    sign, taken at full size (lambda^-1/2 of a damped zero eigenvalue, a large
    step), would be noise too. The rounding of b_i^T G b_j is at most about
    (m + n) eps ||G|| ||b_i|| ||b_j||; below 16 times that an entry counts as zero.
    """
    # the bound itself sits at rounding level: a slack (matrix.SIGN_SLACK) keeps a
    # rounding-noise entry from straddling it
    eps = SIGN_SLACK * torch.finfo(c.dtype).eps * (g.shape[0] + g.shape[1])
    tol = eps * torch.linalg.norm(g) * torch.outer(s_op.norm(dim=0), a_op.norm(dim=0))
    return torch.where(c.abs() > tol, torch.sign(c), torch.zeros_like(c))


def natural_gradients(opt, tracker: LayerTracker, params: list[torch.Tensor], *, beta: float,
                      damping: float, accumulate: bool, invert: bool,
                      grad_scale: torch.Tensor | None = None, group=None,
                      partitioned: list | None = None, **settings) -> tuple[dict, list]:
    """({param: its preconditioned gradient} for every param with a gradient, the state
    updates).

    ``settings``: the rest of ``Settings`` (iterate, init, bias_corrected, exponent,
    damping_after, sign), as the plan's estimator arguments give them; absent, K-FAC's
    EMA from the identity and the damped inverse.

    ``grad_scale``: the GradScaler scale the recorded output gradients carry (the
    backward pass was of ``scale * loss``); S_t is divided by its square. The
    parameters' gradients must already be unscaled.

    ``partitioned``: under ZeroRedundancyOptimizer (``curvc.runtime.zero``), all of its
    parameters, ``params`` being this rank's: every layer of them has its batch factors
    averaged over ``group`` on every rank, and the layers with a tensor in ``params``
    are stepped here (their factors kept in the state of the weight, or of the bias
    where the weight is another rank's).

    Nothing is written: the updates, ``(state, key, value)``, are applied by the
    caller once the rest of the step has been checked, so a refused step leaves
    the statistics as they were.
    """
    st = Settings(beta=float(beta), damping=float(damping), **_typed(settings))
    out = {p: p.grad for p in params if p.grad is not None}
    tracker.refuse(out)
    updates: list = []
    if partitioned is None:
        layers = [m for m in tracker.layers
                  if m.weight in out and (m.bias is None or m.bias in out)]  # optimized, with grads
        averaged = layers
    else:  # ZeRO: every rank averages every partitioned layer's factors, steps its own layers
        everyone = {id(p) for p in partitioned}
        averaged = [m for m in tracker.layers if _with_grads(m) and
                    any(id(p) in everyone for p in _layer_params(m))]
        layers = [m for m in averaged if any(p in out for p in _layer_params(m))]
    batch = _batch_factors(opt, tracker, averaged, group) if accumulate else {}
    op_keys = ("kfac_A_basis", "kfac_S_basis") if st.sign else ("kfac_A_inv", "kfac_S_inv")
    views, refresh = {}, []
    for module in layers:
        # the state of the weight, or of the bias where another rank owns the weight (ZeRO)
        w = module.weight if module.weight in out else module.bias
        state = views[module] = dict(opt.state.get(w, {}))  # written back via updates
        if accumulate:
            a_t, s_t = batch[module]
            if grad_scale is not None:
                s_t = s_t / grad_scale.to(s_t.device, s_t.dtype) ** 2
            for key, new in (("kfac_A", a_t), ("kfac_S", s_t)):
                state[key] = _accumulated(state.get(key), new, st)
                updates.append((w, key, state[key]))
            if st.bias_corrected:
                state["kfac_count"] = state.get("kfac_count", 0) + 1
                updates.append((w, "kfac_count", state["kfac_count"]))
        if "kfac_A" in state and (invert or op_keys[0] not in state):
            refresh.append(module)
    # Under DDP every rank holds the same factors: each layer's operators are computed by
    # one rank and broadcast (kfac-pytorch's split of the inverses), unless opt.matrix_split
    # is False; with "step", their steps too (below). Under ZeRO each rank steps only its
    # own layers already.
    how = getattr(opt, "matrix_split", True)
    split = group if partitioned is None and how else None
    ops = _operators(refresh, views, st, split, layers)
    stepped = [m for m in layers if "kfac_A" in views[m]]  # the rest: the plain gradient
    for module in stepped:
        if module in ops:
            w = module.weight if module.weight in out else module.bias
            for op_key, op in zip(op_keys, ops[module]):
                views[module][op_key] = op
                updates.append((w, op_key, op))
    # matrix_split = "step": each layer's step f(S) G f(A) too is computed by its owner
    # alone and broadcast (kfac-pytorch's memory-optimised layout): 1/N of the products
    # per rank, for a gradient-sized broadcast per step
    def step(m, g):
        return preconditioned(g, views[m][op_keys[1]], views[m][op_keys[0]], st.sign)

    if split is not None and how == "step":
        of, me = _owners(layers, split), torch.distributed.get_rank(split)
        # every rank reads every gradient: under FSDP2 that is an all-gather all must join
        grads = {m: kfac_layers.gradient_matrix(m) for m in stepped}
        mine = {m: (step(m, grads[m]),) for m in stepped if of[m] == me}
        del grads
        steps = {m: v for m, (v,) in distributed.from_owners(mine, stepped, of, split, lambda m: [
            (_factor_dims(m), views[m][op_keys[1]].dtype, views[m][op_keys[1]].device)
        ], copy=False).items()}  # transient: views of the broadcast buffer
    else:
        steps = {m: step(m, kfac_layers.gradient_matrix(m)) for m in stepped}
    for module in stepped:
        out.update({p: d for p, d in kfac_layers.split_step(module, steps[module]).items()
                    if p in out})
    return out, updates


def _operators(refresh: list, views: dict, st: Settings, group, layers: list) -> dict:
    """{layer: (f(A), f(S))} for each layer of ``refresh``, from its factors in ``views``.

    With a ``group``, the layers are shared out over its ranks (``sharded.owners`` over
    all of ``layers``, the largest first, so a layer keeps its owner from step to step):
    each rank computes its own, and each owner broadcasts its operators in one flat
    buffer per dtype. The factors are equal on every rank, so the result is what every
    rank would have computed, and the ranks' states stay identical."""
    def compute(module):
        state = views[module]
        # Bias correction: an EMA from zero over n batches sums weights 1 - beta^n.
        scale = 1.0 / (1.0 - st.beta ** state["kfac_count"]) if st.bias_corrected else 1.0
        return tuple(factor_operator(state[key] * scale if st.bias_corrected else state[key],
                                     st).to(state[key].dtype) for key in ("kfac_A", "kfac_S"))

    if group is None or not refresh:
        return {m: compute(m) for m in refresh}
    of = _owners(layers, group)
    me = torch.distributed.get_rank(group)
    mine = {m: compute(m) for m in refresh if of[m] == me}
    return distributed.from_owners(mine, refresh, of, group, lambda m: [
        (views[m][k].shape, views[m][k].dtype, views[m][k].device) for k in ("kfac_A", "kfac_S")])


def _owners(layers: list, group) -> dict:
    """{layer: the rank of ``group`` that computes it}: ``sharded.owners`` over all of
    ``layers``, the largest first, so that a layer keeps its owner from step to step."""
    from curvc.runtime.sharded import owners
    ranks = torch.distributed.get_world_size(group)
    return dict(zip(layers, owners([_factor_dims(m) for m in layers], ranks)))


def _factor_dims(module: torch.nn.Module) -> tuple[int, int]:
    """(rows of S, rows of A): the output size, and the input size with the bias."""
    w = module.weight
    return w.shape[0], w[0].numel() + (module.bias is not None)


def _layer_params(module: torch.nn.Module) -> list:
    return [module.weight] + ([module.bias] if module.bias is not None else [])


def _with_grads(module: torch.nn.Module) -> bool:
    return all(p.grad is not None for p in _layer_params(module))


def _typed(settings: dict) -> dict:
    """The plan's estimator arguments as ``Settings`` fields (host numbers as floats)."""
    known = {f.name: f.type for f in fields(Settings)}
    unknown = set(settings) - set(known)
    if unknown:
        raise TypeError(f"natural_gradients() got unknown settings {sorted(unknown)}")
    cast = {"float": float, "bool": bool, "str": str}
    # "float | None": a float, or None when the plan leaves it to the iterate's rule
    return {k: None if v is None else cast[known[k].split(" |")[0]](v)
            for k, v in settings.items()}


def _batch_factors(opt, tracker: LayerTracker, layers: list, group) -> dict:
    """{layer: (A_t, S_t)} of this step, averaged over the ranks of ``group``."""
    batch = {}
    for module in layers:
        sums = tracker.factors(module)
        if sums is None:
            raise RuntimeError(
                f"{type(opt).__name__} accumulates K-FAC statistics on this step, but the "
                f"layer {module} ran no forward and backward pass since the last step")
        batch[module] = sums
    if group is not None:  # every rank's factors, averaged in one bucketed all-reduce
        flat = distributed.average([f for m in layers for f in batch[m]], group)
        batch = {m: (flat[2 * i], flat[2 * i + 1]) for i, m in enumerate(layers)}
    return batch
