"""The lowered plan: what a backend renders.

A ``Plan`` is the optimizer's step with every axis of the IR resolved into
arithmetic:

* ``host``: scalar expressions evaluated in Python once per (group, step),
  from the group's hyperparameters and the step count. They reach kernels
  as runtime arguments, so a scheduler changing ``lr`` never recompiles.
* ``flags``: booleans evaluated the same way; a ``Select`` on a flag is a
  static choice (a Python ``if`` in torch, a ``tl.constexpr`` in Triton).
* ``reductions``: elementwise expressions summed before the update (a norm), with
  no host sync, over the reduction's *scope*: every parameter of the optimizer
  (``global``), the parameters of one param group (``group``), or each parameter
  tensor on its own (``tensor``). ``Reduced(name)`` in a store is the sum of the
  scope that tensor belongs to. A reduction may read earlier ones (a clipped
  gradient's step norm): ``reduction_levels`` orders them.
* ``stores``: the new values of state buffers and of the parameter, as one
  expression DAG over the loaded tensors; backends render it as one fused pass.
  Every store is wrapped by the ``keep_on_nonfinite`` pass (curvc/passes.py):
  ``Select(NONFINITE_FLAG, keep_if(Reduced(NONFINITE_VALUE), old, new), new)``,
  so a step the runtime flags (``nonfinite="skip"``, a GradScaler's found_inf)
  stores the old values, decided on the device; the host flag is off otherwise,
  and the step is today's.

Expressions are frozen dataclasses, so equal subtrees are equal values and
backends can share them (common-subexpression elimination for free).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from curvc import ir


# --- expressions -------------------------------------------------------------

@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Load:
    """An elementwise tensor: 'param', 'grad', a state buffer, or a runtime input."""

    name: str


@dataclass(frozen=True)
class Scalar:
    """A host scalar: a hyperparameter, 'step', or an entry of ``Plan.host``."""

    name: str


@dataclass(frozen=True)
class Reduced:
    """The (device) sum named by a ``Reduction``, over the scope of the tensor at hand."""

    name: str


@dataclass(frozen=True)
class Op:
    """An operator (each backend maps ``op`` to source). Besides arithmetic:
    ``div_or_zero`` is a / b where b > 0, else 0 (a normalized step of a zero
    gradient); ``lerp`` is a + w * (b - a) in torch.lerp's order of arguments;
    ``keep_if(flag, old, new)`` is old where the 0-d flag is nonzero, else new;
    ``eq``, ``ne``, ``gt``, ``mod``, ``not`` and ``and`` occur in host expressions only."""

    op: str
    args: tuple["Expr", ...]


@dataclass(frozen=True)
class Select:
    """``then`` if the host flag is true, else ``other``: decided once per launch."""

    flag: str
    then: "Expr"
    other: "Expr"


@dataclass(frozen=True)
class Precondition(Op):
    """``P^-e x`` for a curvature P with matrix structure, kept per tensor.

    ``stage`` names a ``KroneckerStage`` of the plan. ``args`` are the
    statistic the stage accumulates (the gradient), the value it
    preconditions (the momentum), then the stage's host parameters in the
    order of ``KroneckerStage.params``. An ``Op`` subclass, so scheduling
    and the passes treat it as one more operator; only the torch backend
    renders it (a call into ``curvc.runtime.matrix``).
    """

    stage: str = ""


Expr = Union[Const, Load, Scalar, Reduced, Op, Select]

# The runtime's skip-this-step signal (curvc/runtime/amp.py): a host flag, on when
# a step may be skipped, and a 0-d device value, nonzero on a step to skip. Like
# ``maximize``, neither is computed by the plan's host code: the runtime supplies both.
NONFINITE_FLAG = "nonfinite_skip"
NONFINITE_VALUE = "nonfinite"


def reads_only(expr: Expr, wanted: type, excluded: type) -> bool:
    """Whether a node of type ``wanted`` is under ``expr`` and none of ``excluded``: a
    value of the loaded tensors alone (``Load``, not ``Reduced``), or of the reductions
    alone (the other way round)."""
    found = False
    for n in walk(expr):
        if isinstance(n, excluded):
            return False
        found = found or isinstance(n, wanted)
    return found


def walk(expr: Expr):
    """Every node of an expression, children before parents, each once."""
    seen = set()
    stack = [(expr, False)]
    while stack:
        node, done = stack.pop()
        if done:
            yield node
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        if isinstance(node, Op):
            stack.extend((a, False) for a in reversed(node.args))
        elif isinstance(node, Select):
            stack.extend([(node.other, False), (node.then, False)])


# --- plan ----------------------------------------------------------------------

@dataclass(frozen=True)
class Buffer:
    """A state tensor kept per parameter, shaped like it."""

    name: str
    init: Expr = Const(0.0)  # host expression: the fill value
    when: str | None = None  # allocated only while this flag is true


SCOPES = ("global", "group", "tensor")


@dataclass(frozen=True)
class Reduction:
    name: str
    value: Expr  # summed over every element of every tensor of the scope
    scope: str = "global"  # one of SCOPES


def reduction_levels(reductions) -> list[list[Reduction]]:
    """The reductions in passes: each reads only those of earlier passes (a reduction
    that reads none is in the first), in the plan's order within a pass."""
    level: dict[str, int] = {}
    for r in reductions:
        reads = [level[n.name] for n in walk(r.value) if isinstance(n, Reduced) and n.name in level]
        level[r.name] = 1 + max(reads, default=-1)
    out: list[list[Reduction]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for r in reductions:
        out[level[r.name]].append(r)
    return out


@dataclass(frozen=True)
class Store:
    target: str  # 'param' or a buffer name
    value: Expr
    when: str | None = None  # only if this host flag is true


@dataclass(frozen=True)
class Validator:
    """A runtime check of a constructor argument, mirroring torch.optim's ValueErrors."""

    hyper: str
    index: int | None
    constraint: str
    where: str


@dataclass(frozen=True)
class Estimator:
    """A curvature estimator the runtime runs before the fused update.

    It fills the elementwise input ``input`` on steps where the host flag
    ``when`` is true (every step when None). ``args`` are host expressions
    (or enum words) the estimator function takes as keywords. ``scope`` is what one
    of its computations spans: each tensor alone, or each layer (K-FAC's factors
    read the layer's inputs and output gradients).
    """

    kind: str  # with scope, a key of curvc.runtime.estimators.SOURCES
    input: str
    args: tuple[tuple[str, object], ...]
    when: str | None = None
    scope: str = "tensor"  # 'tensor' | 'layer' 


@dataclass(frozen=True)
class KroneckerStage:
    """One Kronecker-factored preconditioner per tensor (Shampoo's L and R).

    For a tensor of order k, mode i with size d_i <= max_dim keeps a d_i x d_i
    factor ``<factors>_i``: the Gram matrix of the statistic unfolded along mode
    i, summed, averaged (ema) or this step's only (instant), and divided by
    ``bias_correction`` before its root. Its spectral function, refreshed when the
    flag ``refresh`` holds, is one scalar function of the factor's eigenvalues:

    * ``length='root'``: ``R_i = f(L_i)`` with f(lam) = 1 / max((lam + eps_inside)^e,
      floor), plus ``eps_after I``; the step is the value multiplied along every
      mode by R_i;
    * ``length='eigen_sign'``: the value rotated into the factors' eigenbasis Q, its
      sign taken there, scaled by f(lam) per mode, and rotated back
      (d = P^-1/2 Q sign(Q^T m), the paper's eigenbasis-normalized step).

    ``e`` is ``exponent``, divided by k when ``per_mode`` (the product of k Gram
    factors counts the gradient k times). A non-positive eigenvalue without
    damping or floor gets 0 (the pseudo-inverse; ``curvc.runtime.matrix``).
    """

    name: str
    function: str  # the curvc.runtime.matrix function that runs it, per tensor
    factors: str  # state-key prefixes (pytorch-optimizer's names, so checkpoints read alike)
    roots: str
    accumulate: str  # 'sum' | 'ema' | 'instant'
    accumulate_when: str | None  # flag: accumulate on this step (None: every step)
    refresh: str | None  # flag: recompute the roots on this step (None: every step)
    per_mode: bool
    length: str = "root"  # 'root' | 'eigen_sign'
    params: tuple[str, ...] = ("beta", "init", "exponent", "eps_inside", "eps_after", "floor",
                               "bias_correction", "max_dim")

    reads_param = False  # the extern's tensors: the statistic and the value only

    @property
    def many(self) -> str | None:
        """The batched form's function (``curvc.runtime.batched``, through matrix)."""
        return "kronecker_many" if self.function == "kronecker" else None

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(sorted({f for f in (self.refresh, self.accumulate_when) if f}))

    def keywords(self, params: list[str], flag) -> list[str]:
        """The call's keyword arguments as source: ``params`` rendered in ``self.params``
        order, ``flag(name)`` a flag (or True for None)."""
        return [f"factors={self.factors!r}", f"roots={self.roots!r}",
                f"accumulate={self.accumulate!r}", f"update={flag(self.accumulate_when)}",
                f"refresh={flag(self.refresh)}", f"length={self.length!r}",
                *(f"{n}={a}" for n, a in zip(self.params, params)), f"per_mode={self.per_mode}"]

    @property
    def doc(self) -> str:
        what = ("the value's sign in the factors' eigenbasis, scaled by their roots"
                if self.length == "eigen_sign" else "the value times every mode's root")
        return (f"One tensor's Kronecker step: factors accumulated ({self.accumulate}) from "
                f"the statistic, then {what}.")


@dataclass(frozen=True)
class FactoredStage:
    """The diagonal of a curvature from its row and column statistics, per tensor (Adafactor).

    For a tensor of order >= 2, the statistic's means over the last dim (R, shape
    ``(..., m, 1)``) and over the one before (C, ``(..., 1, n)``) are accumulated
    (``accumulate``: 'ema', R <- beta R + weight r from 0 with weight = 1 - beta, or 1 for
    ``ema_or_sum``'s sum at beta = 1; 'sum' from ``init``; or 'instant') when the flag
    ``accumulate_when`` holds, and the diagonal is their outer
    product V = R C / max(mean(R), eps) (0 where that is 0), divided by
    ``bias_correction``; a tensor of lower order keeps the plain diagonal V itself. The
    step is f(V) times the value (``length='root'``) or its sign (``'eigen_sign'``),
    f the spectral function of ``curvc.runtime.roots.spectral`` applied elementwise
    (exponent, eps_inside, eps_after, floor); then, per tensor, ``clipped``: divided by
    max(1, RMS / clip), and ``relative``: times max(scale_eps, RMS(param)), the
    parameter's RMS before the step (the relative step's per-tensor part). Those norms
    are computed in the extern, after its spectral function.
    """

    name: str
    accumulate: str  # 'ema' | 'sum' | 'instant'
    accumulate_when: str | None
    length: str = "root"
    clipped: bool = False
    relative: bool = False
    function: str = "factored"
    many = "factored_many"  # the batched form (curvc.runtime.batched)
    refresh = None  # V is recomputed from R and C every step
    params: tuple[str, ...] = ("beta", "weight", "init", "exponent", "eps_inside", "eps_after",
                               "floor", "eps", "bias_correction", "clip", "scale_eps")

    @property
    def reads_param(self) -> bool:
        return self.relative

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.accumulate_when,) if self.accumulate_when else ()

    def keywords(self, params: list[str], flag) -> list[str]:
        return [f"accumulate={self.accumulate!r}", f"update={flag(self.accumulate_when)}",
                f"length={self.length!r}", f"clipped={self.clipped}",
                f"relative={self.relative}", *(f"{n}={a}" for n, a in zip(self.params, params))]

    @property
    def doc(self) -> str:
        return (f"One tensor's factored step: row and column statistics accumulated "
                f"({self.accumulate}), their outer product as the diagonal, applied to the "
                f"value" + (", RMS-clipped" if self.clipped else "")
                + (", scaled by RMS(param)" if self.relative else "") + ".")


@dataclass(frozen=True)
class PolarStage:
    """The polar factor U V^T of a matrix value (G = U S V^T) by a Newton-Schulz iteration,
    per tensor, keeping no state: what a KroneckerStage computes for ``iterate instant``
    and a gradient-norm length when the statistic is the value (L^-1/4 G R^-1/4), with
    matrix products only (Muon). X_0 = G / max(||G||_F, eps), then ``steps`` times
    X <- a X + (b A + c A^2) X, A = X X^T (on the shorter side), in ``precision``.
    A vector is a 1 x n matrix; a tensor of order 3 or more is refused at run time.
    """

    name: str
    precision: str  # 'bfloat16' | 'float32' | 'float64'
    function: str = "polar"
    many = "polar_many"  # the batched form (curvc.runtime.batched)
    params: tuple[str, ...] = ("steps", "a", "b", "c", "eps")
    refresh: str | None = None  # no roots kept, so nothing to refresh or accumulate
    accumulate_when: str | None = None

    reads_param = False
    flags: tuple[str, ...] = ()

    def keywords(self, params: list[str], flag) -> list[str]:
        return [*(f"{n}={a}" for n, a in zip(self.params, params)),
                f"precision={self.precision!r}"]

    @property
    def doc(self) -> str:
        return (f"One tensor's polar factor by the Newton-Schulz iteration (in "
                f"{self.precision}), from its value alone.")


@dataclass(frozen=True)
class SecantStage:
    """A quasi-Newton step over all parameters as one flat vector (L-BFGS).

    The inverse curvature is the low-rank (two-loop) product of the last
    ``history`` secant pairs (s = change of theta, y = change of gradient);
    each ``step(closure)`` runs up to ``iterations`` of them, stopping early
    on the tolerances. Every field is a host expression over the group's
    hyperparameters. ``curvc.runtime.secant`` runs it. Each iteration's
    direction d = -H^-1 g is then divided by sqrt(g^T H^-1 g) when ``normalized``
    (so ||d||_H = 1), and scaled by min(1, clip / ||d||) when ``clip`` is not
    0, or each parameter's slice d_p divided by max(1, RMS(d_p) / rms_clip) when
    ``rms_clip`` is not 0, before the step size (lr or the line search) is applied.
    """

    history: Expr
    iterations: Expr
    tolerance_grad: Expr
    tolerance_change: Expr
    normalized: bool = False
    clip: Expr = Const(0.0)
    rms_clip: Expr = Const(0.0)


@dataclass(frozen=True)
class DenseStage:
    """The whole n x n curvature over all parameters as one vector (small models).

    ``curvature`` is 'hessian' (exact, from gradients that carry their graph),
    'fisher' (from per-example gradients on labels sampled from the model's
    logits) or 'empirical_fisher' (g g^T of the step's gradient). It is accumulated
    (``accumulate``: 'instant', 'ema': C <- beta C + weight c from 0, or 'sum' from
    init I) on steps where the flag ``refresh`` holds (every step when None), divided by
    ``bias_correction`` (C stays uncorrected), and the step is
    ``d = (root(C + eps_inside I) + eps_after I)^-1 g`` shaped by ``length``
    ('none': root = C; 'gradient_norm': C^(power/2); 'normalized': d scaled to
    ||d||_C = 1; 'eigen_sign': C^-1/2 Q sign(Q^T g)). ``curvc.runtime.dense``
    runs it, and hands d to the plan as its input ``preconditioned``.
    """

    curvature: str
    accumulate: str
    refresh: str | None
    length: str
    samples: Expr  # labels drawn per example (fisher)
    beta: Expr
    init: Expr
    eps_inside: Expr
    eps_after: Expr
    power: Expr
    weight: Expr = Const(0.0)  # this refresh's weight in an EMA (1 - beta; 1 for a sum)
    bias_correction: Expr = Const(1.0)  # 1 - beta^r of a bias-corrected EMA, else 1
    # clip length(C): the Newton step's eigencoordinates capped at C times the length's
    # (0: no clip)
    clip: Expr = Const(0.0)


@dataclass(frozen=True)
class Plan:
    name: str
    hypers: tuple[ir.Hyper, ...]
    validators: tuple[Validator, ...]
    buffers: tuple[Buffer, ...]
    inputs: tuple[str, ...]  # elementwise inputs besides param and grad (curvature estimates)
    host: tuple[tuple[str, Expr], ...]
    flags: tuple[tuple[str, Expr], ...]
    reductions: tuple[Reduction, ...]
    stores: tuple[Store, ...]
    estimator: Estimator | None = None
    matrix: tuple[KroneckerStage | FactoredStage | PolarStage, ...] = ()  # per-tensor externs
    secant: SecantStage | None = None  # a whole-model quasi-Newton step (no stores)
    dense: DenseStage | None = None  # the dense matrix feeding the plan's input

    @property
    def host_inputs(self) -> tuple[str, ...]:
        """Names host expressions may read: flattened hyperparameters, 'step', and the
        tensor's shape where the plan reads it (``SHAPE``)."""
        return tuple(flat_hyper_names(self.hypers)) + ("step",) + (SHAPE if self.shaped else ())

    @property
    def shaped(self) -> bool:
        """Whether a host value depends on the tensor's shape (then the runtime computes
        the host values per shape, and buckets tensors by it)."""
        exprs = [e for _, e in self.host] + [e for _, e in self.flags] + \
            [st.value for st in self.stores]
        return any(isinstance(n, Scalar) and n.name in SHAPE for e in exprs for n in walk(e))

    def stage(self, name: str) -> KroneckerStage | FactoredStage | PolarStage:
        return next(m for m in self.matrix if m.name == name)

    @property
    def elementwise(self) -> bool:
        """Whether the whole step is elementwise (fusable into one pass per tensor)."""
        # A dense plan's matrix is a model-scope source (like K-FAC's layers): the
        # step that reads its preconditioned gradient is elementwise.
        return not self.matrix and self.secant is None

    @property
    def whole_model(self) -> bool:
        """Whether the step runs over all parameters as one vector (no stores)."""
        return self.secant is not None or self.dense is not None


# The tensor's shape as a matrix (rows, cols), and its order (ndim), host inputs like
# "step" that the runtime sets per tensor (a vector is 1 x n; an order-k tensor shape[0] x
# the rest). Named with a leading '_', which no hyperparameter's name may have.
SHAPE = ("_rows", "_cols", "_ndim")


def flat_hyper_names(hypers) -> list[str]:
    """``betas = (a, b)`` is read as ``betas_0`` and ``betas_1``."""
    out = []
    for h in hypers:
        if isinstance(h.default, tuple):
            out.extend(f"{h.name}_{i}" for i in range(len(h.default)))
        else:
            out.append(h.name)
    return out
