"""The IR: one frozen dataclass per column of Table 1, one ``Optimizer`` per spec.

Field values are ``Const`` (a number, a boolean or an enum word written in
the spec) or ``HyperRef`` (a named hyperparameter, optionally indexed, that
becomes a constructor keyword). Spans ride along for error messages and are
ignored by ``==`` and ``hash``. Passes return new nodes (``dataclasses.replace``),
never mutate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from curvc.errors import Span, span_field


@dataclass(frozen=True)
class Const:
    value: Union[float, bool, str]
    span: Span = span_field()

    def __str__(self) -> str:
        v = self.value
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)


@dataclass(frozen=True)
class HyperRef:
    name: str
    index: int | None = None
    span: Span = span_field()

    def __str__(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"


Arg = Union[Const, HyperRef]


# --- expressions (``let``, ``state``, ``CLAUSE = EXPR``, ``update = EXPR``) ----

@dataclass(frozen=True)
class Var:
    """A name in an expression: grad, param, step, direction, a ``let`` or a ``state``.
    A state read inside its own definition, or through ``old``, is its stored value;
    anywhere else, this step's new value."""

    name: str
    span: Span = span_field()

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Apply:
    """A function or operator (``curvc.language.FUNCTIONS``, ``OPERATORS``) applied."""

    fn: str
    args: tuple["Expr", ...]
    span: Span = span_field()

    def __str__(self) -> str:
        from curvc.language import show_apply  # the one printer of the expression language
        return show_apply(self)


Expr = Union[Const, HyperRef, Var, Apply]


def hyper_refs(expr: "Expr | None"):
    """Every hyperparameter reference in an expression, in reading order."""
    if isinstance(expr, HyperRef):
        yield expr
    elif isinstance(expr, Apply):
        for a in expr.args:
            yield from hyper_refs(a)


@dataclass(frozen=True)
class Let:
    name: str
    expr: Expr
    span: Span = span_field()


@dataclass(frozen=True)
class State:
    """A named buffer: its new value each step, from ``init`` (a host value) at the start."""

    name: str
    expr: Expr
    init: Expr
    span: Span = span_field()


@dataclass(frozen=True)
class Hyper:
    """A named hyperparameter: a constructor keyword with the spec's default, an int
    where the spec wrote a whole number without '.' or an exponent."""

    name: str
    default: Union[int, float, bool, tuple, str]
    span: Span = span_field()
    # a word (str default): the words it may take, those of the argument that reads it
    choices: tuple[str, ...] = field(default=(), repr=False)
    # a default that is another hyperparameter (``shampoo_beta = betas[1]``): the
    # constructor's default is None, which reads that one's value at step time; ``default``
    # holds that one's default (what check and explain evaluate)
    fallback: "HyperRef | None" = field(default=None, repr=False)
    # ``hyper NAME = none``: the constructor's default is None (not given), which only
    # ``given(NAME)`` reads; ``default`` is None then
    optional: bool = field(default=False, repr=False)


# --- the paper's axes --------------------------------------------------------

@dataclass(frozen=True)
class Curvature:
    """Calculating approximation: which matrix is estimated, and how."""

    kind: str  # constant | empirical_fisher | fisher | gauss_newton_bartlett | hutchinson | hessian | secant | kfac
    samples: Arg | None = None
    distribution: Arg | None = None
    spatial_average: Arg | None = None
    squared: bool = False  # accumulate the square of the estimate (AdaHessian)
    scale: Arg | None = None  # multiply the estimate (Sophia's rho)
    every: Arg | None = None  # estimate every k steps, reuse it in between
    of: Expr | None = None  # empirical_fisher of this vector instead of the gradient
    value: Expr | None = None  # kind 'expression': the elementwise estimate itself
    span: Span = span_field()


@dataclass(frozen=True)
class Structure:
    """Structure approximation: what shape the curvature matrix is given."""

    kind: str  # scalar | diagonal | factored | kronecker | dense | low_rank
    max_dim: Arg | None = None
    root: Arg | None = None  # kronecker: eigh | newton_schulz, and the iteration's arguments
    steps: Arg | None = None
    a: Arg | None = None
    b: Arg | None = None
    c: Arg | None = None
    eps: Arg | None = None  # newton_schulz: the norm floor; factored: the mean row's
    precision: Arg | None = None
    every: Arg | None = None  # recompute the inverse root every k steps
    # kronecker(basis = eigen): the diagonal pipeline in the factors' eigenbasis
    basis: Arg | None = None
    factor_beta: Arg | None = None
    refresh: Arg | None = None
    merge_dims: Arg | None = None  # kronecker: merge small adjacent dims first
    vectors: Arg | None = None
    layout: Arg | None = None
    block: Arg | None = None  # kronecker: split modes longer than max_dim into blocks
    factor_root: Arg | None = None  # kronecker: each factor's root p, L^(-power/p) (0: 2k)
    span: Span = span_field()


@dataclass(frozen=True)
class Iterate:
    """Iterative approximation: how estimates are combined over steps."""

    kind: str  # instant | ema | power_ema | sum | secant
    beta: Arg | None = None
    decay: Arg | None = None  # power_ema: beta_t = 1 - t^decay
    init: Arg | None = None
    history: Arg | None = None
    iterations: Arg | None = None  # secant: iterations per step (closure evaluations)
    tolerance_grad: Arg | None = None  # secant: stop when max |g_i| is below this
    tolerance_change: Arg | None = None  # secant: stop when the step or loss change is below this
    keep_max: Arg | None = None  # also track the running maximum (AMSGrad)
    every: Arg | None = None
    delayed: bool = False  # the first refresh comes after k steps, not at step 1
    # True, or a boolean hyperparameter (`bias_corrected(flag)`) that decides it each step
    bias_corrected: "bool | HyperRef" = False
    span: Span = span_field()


@dataclass(frozen=True)
class Length:
    """Length limitation: which norm of the step is fixed."""

    kind: str  # none | gradient_norm | normalized | eigen_sign
    power: Arg | None = None
    scope: Arg | None = None  # normalized: the norm's tensors (global | group | tensor)
    span: Span = span_field()


@dataclass(frozen=True)
class Clip:
    kind: str  # none | global_norm | elementwise | tensor_rms | length
    threshold: Arg | None = None
    scope: Arg | None = None  # global_norm: the norm's tensors (global | group | tensor)
    on: Arg | None = None  # step (the finished d) | gradient (g, before anything reads it)
    eps: Arg | None = None  # global_norm: added to the norm, C / (||d|| + eps)
    span: Span = span_field()

    @property
    def on_gradient(self) -> bool:
        return self.on is not None and self.on.value == "gradient"


@dataclass(frozen=True)
class Momentum:
    kind: str  # none | ema | heavy_ball
    beta: Arg | None = None
    dampening: Arg | None = None
    nesterov: Arg | None = None
    bias_corrected: "bool | HyperRef" = False  # as Iterate's
    value: Expr | None = None  # kind 'expression': the direction that is preconditioned
    on: Arg | None = None  # gradient (g, before the preconditioner) | step (the finished d)
    span: Span = span_field()

    @property
    def on_step(self) -> bool:
        return self.on is not None and self.on.value == "step"


@dataclass(frozen=True)
class Decay:
    kind: str  # none | l2 | decoupled
    rate: Arg | None = None
    decoupled: Arg | None = None  # l2 only: switch to decoupled decay (torch Adam's flag)
    fixed: Arg | None = None  # the decoupled decay's factor is 1 - wd, not 1 - lr*wd
    span: Span = span_field()


@dataclass(frozen=True)
class Damping:
    """Where epsilon enters the preconditioner."""

    kind: str  # none | add (after the root) | inside (before the root) | floor (max)
    eps: Arg | None = None
    span: Span = span_field()


@dataclass(frozen=True)
class Schedule:
    kind: str  # constant | inverse_time | relative_step
    rate: Arg | None = None
    eps: Arg | None = None  # relative_step: the floor of RMS(theta)
    adjust: Arg | None = None  # none | original | match_rms_adamw: the step's lr by shape
    span: Span = span_field()


@dataclass(frozen=True)
class Graft:
    """The step's direction from the structure, its per-block norm from a diagonal
    pipeline's step on the same momentum (Distributed Shampoo's grafting)."""

    kind: str  # none | sgd | adagrad | rmsprop | adam
    beta: Arg | None = None
    eps: Arg | None = None
    start: Arg | None = None  # before this step, the grafted pipeline's step alone
    span: Span = span_field()


# One per clause of the language (curvc.language.CLAUSES, in that order).
AXIS_TYPES = {"curvature": Curvature, "structure": Structure, "iterate": Iterate,
              "length": Length, "clip": Clip, "momentum": Momentum, "decay": Decay,
              "damping": Damping, "schedule": Schedule, "graft": Graft}


def clause_label(axis: str, node) -> str:
    """How messages and docstrings name a clause: ``clip global_norm``, and the gradient's
    clip as ``clip global_norm (on = gradient)``."""
    on = " (on = gradient)" if isinstance(node, Clip) and node.on_gradient else ""
    on = " (on = step)" if isinstance(node, Momentum) and node.on_step else on
    return f"{axis} {node.kind}{on}"


@dataclass(frozen=True)
class Optimizer:
    name: str
    hypers: tuple[Hyper, ...]
    curvature: Curvature
    structure: Structure
    iterate: Iterate
    length: Length
    clip: Clip
    momentum: Momentum
    decay: Decay
    damping: Damping
    schedule: Schedule
    # A second clip clause, `clip ...(on = gradient)`: the gradient's, before the step.
    gradient_clip: Clip = Clip("none")
    graft: Graft = Graft("none")
    # A second momentum clause, `momentum ...(on = step)`: of the finished step, after the
    # preconditioner (Distributed Shampoo's momentum).
    step_momentum: Momentum = Momentum("none")
    lets: tuple[Let, ...] = ()
    states: tuple[State, ...] = ()
    update: Expr | None = None  # what multiplies lr (default: the direction d)
    source: str = ""
    file: str = "<spec>"
    span: Span = span_field()

    def axes(self) -> list[tuple[str, object]]:
        """(clause, node) for every clause the spec has: one per axis, the gradient's
        clip (a second ``clip`` clause) and the step's momentum (a second ``momentum``)
        when it has them."""
        out = [(axis, getattr(self, axis)) for axis in AXIS_TYPES]
        if self.gradient_clip.kind != "none":
            out.append(("clip", self.gradient_clip))
        if self.step_momentum.kind != "none":
            out.append(("momentum", self.step_momentum))
        return out

    def expressions(self) -> list[tuple[str, Expr]]:
        """(where, expression) for every expression the spec writes outside a clause
        argument: its lets, its states' updates and starts, the momentum and curvature
        expressions and the update."""
        out = [(f"let {x.name}", x.expr) for x in self.lets]
        for s in self.states:
            out += [(f"state {s.name}", s.expr), (f"the start of state {s.name}", s.init)]
        for axis, node in (("momentum", self.momentum), ("curvature", self.curvature)):
            out += [(axis, e) for e in (getattr(node, "value", None),
                                        getattr(node, "of", None)) if e is not None]
        if self.update is not None:
            out.append(("update", self.update))
        return out

    def hyper(self, name: str) -> Hyper:
        return next(h for h in self.hypers if h.name == name)

    @property
    def hyper_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hypers)
