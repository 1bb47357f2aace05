"""The curv language as data: its clauses, each clause's forms, and its reserved words.

The grammar (``grammar/curv.lark``) fixes only the shape of a spec; which
clauses exist, which forms each takes, with which arguments and modifiers,
is this table. The parser reads it to say what it expected, the check pass
to validate a spec against it, lowering for a form's defaults, so a new form
is one entry here (and its lowering).
"""
from __future__ import annotations

from dataclasses import dataclass

from curvc import names


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str  # number | int | bool | enum
    default: object = None  # None: required
    constraint: str = "any"  # a key of constraints.CONSTRAINTS (count_* for bounded counts)
    choices: tuple[str, ...] = ()
    # each choice computes something else (a root method), so `curvc coverage` makes
    # every choice a point of the language's cross product
    varies: bool = False
    # an enum whose word a hyperparameter may give (chosen at run time, on the host);
    # the others decide the generated code, so the spec writes them
    by_hyper: bool = False

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class FormSpec:
    args: tuple[ArgSpec, ...] = ()
    modifiers: tuple[str, ...] = ()  # bare words and 'every'


# Muon's Newton-Schulz iteration (torch.optim.Muon's defaults: Jordan et al.'s quintic)
_NEWTON_SCHULZ = (ArgSpec("steps", "int", 5.0, "count_newton_schulz_steps"),
                  ArgSpec("a", "number", 3.4445), ArgSpec("b", "number", -4.775),
                  ArgSpec("c", "number", 2.0315), ArgSpec("eps", "number", 1e-7, "positive"),
                  ArgSpec("precision", "enum", "bfloat16",
                          choices=("bfloat16", "float32", "float64")))
NEWTON_SCHULZ_ARGS = tuple(a.name for a in _NEWTON_SCHULZ)

_ADJUST = ArgSpec("adjust", "enum", "none", choices=("none", "original", "match_rms_adamw"),
                  by_hyper=True)

_BETA = lambda name="beta": ArgSpec(name, "number", constraint="unit")  # noqa: E731

# Each form's comment is the math it stands for (README's language table says more).
FORMS: dict[str, dict[str, FormSpec]] = {
    "curvature": {
        "constant": FormSpec(),  # L*I, the a-priori smoothness constant (folded into lr)
        "empirical_fisher": FormSpec(),  # F~ = E_data[g g^T]; its diagonal is g*g
        # F = E_{y~p(y|x)}[g g^T], labels sampled from the model
        "fisher": FormSpec((ArgSpec("samples", "int", 1.0, "count_samples"),)),
        # batch size * (grad of loss on sampled labels)^2
        "gauss_newton_bartlett": FormSpec(
            (ArgSpec("samples", "int", 1.0, "count_samples"),
             ArgSpec("scale", "number", 1.0, "positive")),
            modifiers=("squared", "every")),
        # the Hessian's diagonal, E[z * (H z)] with random probes z
        "hutchinson": FormSpec(
            (ArgSpec("samples", "int", 1.0, "count_samples"),
             ArgSpec("distribution", "enum", "rademacher", choices=("rademacher", "gaussian")),
             ArgSpec("spatial_average", "bool", False),
             ArgSpec("scale", "number", 1.0, "positive")),
            modifiers=("squared", "every")),
        "hessian": FormSpec(),  # the exact Hessian H (small models)
        "secant": FormSpec(),  # secant pairs: H s ~ y with s = dtheta, y = dgrad
        "kfac": FormSpec(),  # F~ per layer as (a a^T) kron (dL/ds dL/ds^T)
    },
    "structure": {
        "scalar": FormSpec(),  # L*I
        "diagonal": FormSpec(),  # diag(lambda_1..lambda_n)
        # L kron R per tensor (block-diagonal over tensors); root = eigh: each factor's
        # root by an eigendecomposition; root = newton_schulz: the polar factor U V^T that
        # L^-1/4 G R^-1/4 is (iterate instant, length gradient_norm), by `steps` of
        # X <- a X + (b A + c A^2) X, A = X X^T, from X = G / max(||G||_F, eps), in `precision`
        "kronecker": FormSpec((ArgSpec("max_dim", "int", 8192.0, "count_max_dim"),
                               ArgSpec("root", "enum", "eigh", choices=("eigh", "newton_schulz"),
                                       varies=True),
                               *_NEWTON_SCHULZ),
                              modifiers=("every",)),
        "dense": FormSpec(),  # the whole n x n matrix
        "low_rank": FormSpec(),  # rank-2 updates from the secant pairs (iterate secant)
    },
    "iterate": {
        "instant": FormSpec(modifiers=("every",)),  # the current estimate only
        "ema": FormSpec((_BETA(), ArgSpec("keep_max", "bool", False)),  # C <- beta*C + (1-beta)*c
                        modifiers=("bias_corrected", "every", "delayed")),
        "sum": FormSpec((ArgSpec("init", "number", 0.0, "nonneg"),),  # C <- C + c
                        modifiers=("every",)),
        # two-loop recursion over the last k pairs, up to `iterations` closure calls a step
        "secant": FormSpec((ArgSpec("history", "int", constraint="count_history"),
                            ArgSpec("iterations", "int", 20.0, "count_iterations"),
                            ArgSpec("tolerance_grad", "number", 1e-7, "nonneg"),
                            ArgSpec("tolerance_change", "number", 1e-9, "nonneg"))),
    },
    "length": {
        "none": FormSpec(),  # d = P^-1 g (Newton, NGD)
        # ||d_i||_P = eps*g_i: d = P^-1/2 g (Adam, Adagrad)
        "gradient_norm": FormSpec((ArgSpec("power", "number", 1.0, "positive"),)),
        "normalized": FormSpec(),  # ||d||_P = eps: d = P^-1 g / sqrt(g^T P^-1 g)
        "eigen_sign": FormSpec(),  # ||d_i||_P = eps: d = P^-1/2 Q sign(Q^T g) (sign GD)
    },
    "clip": {
        "none": FormSpec(),
        # d <- d * min(1, C/||d||)
        "global_norm": FormSpec((ArgSpec("threshold", "number", constraint="positive"),)),
        # d_i = clamp(d_i, -threshold, threshold) (Sophia)
        "elementwise": FormSpec((ArgSpec("threshold", "number", constraint="positive"),)),
    },
    "momentum": {
        "none": FormSpec(),
        "ema": FormSpec((_BETA(),), modifiers=("bias_corrected",)),  # m <- beta*m + (1-beta)*g
        # b <- beta*b + (1-dampening)*g (b = g on the first step)
        "heavy_ball": FormSpec((_BETA(), ArgSpec("dampening", "number", 0.0, "unit_closed"),
                                ArgSpec("nesterov", "bool", False))),
    },
    "decay": {
        "none": FormSpec(),
        # g <- g + wd*theta (decoupled = true: as `decay decoupled`)
        "l2": FormSpec((ArgSpec("rate", "number", constraint="nonneg"),
                        ArgSpec("decoupled", "bool", False))),
        # theta <- theta*(1 - lr*wd)
        "decoupled": FormSpec((ArgSpec("rate", "number", constraint="nonneg"),)),
    },
    "damping": {
        "none": FormSpec(),
        # P + eps, after the root
        "add": FormSpec((ArgSpec("eps", "number", constraint="nonneg"),)),
        # (C + eps)^power, before the root
        "inside": FormSpec((ArgSpec("eps", "number", constraint="nonneg"),)),
        "floor": FormSpec((ArgSpec("eps", "number", constraint="nonneg"),)),  # max(P, eps)
    },
    # adjust: the step (not decoupled decay) takes lr_t * s(rows, cols), the tensor's shape
    # as a matrix (torch.optim.Muon's adjust_lr_fn): original sqrt(max(1, rows/cols)),
    # match_rms_adamw 0.2 sqrt(max(rows, cols)), none 1
    "schedule": {
        "constant": FormSpec((_ADJUST,)),
        # lr_t = lr / (1 + (t-1)*rate)
        "inverse_time": FormSpec((ArgSpec("rate", "number", constraint="nonneg"), _ADJUST)),
    },
}

# The clauses, in the order of Table 1's columns and then the step's terms: the
# IR's axes (``ir.AXIS_TYPES``) and the parser's list of clause keywords.
CLAUSES: tuple[str, ...] = tuple(FORMS)

DEFAULT_FORMS = {"iterate": "instant", "clip": "none", "momentum": "none", "decay": "none",
                 "damping": "none", "schedule": "constant"}
REQUIRED_CLAUSES = {
    "curvature": "the paper's Calculating Approximation column",
    "structure": "the paper's Structure Approximation column",
    "length": "the paper's Length Limitation column: none, gradient_norm, normalized or eigen_sign",
}

# The argument every spec declares, and the step count after `every`.
LR = ArgSpec("lr", "number", constraint="nonneg")
EVERY = ArgSpec("every", "int", constraint="count_every")

# Why a modifier exists, for the error that says it is on the wrong form.
MODIFIER_WHY = {
    "bias_corrected": "bias correction undoes the zero start of an exponential moving average",
    "squared": "AdaHessian accumulates the square of Hutchinson's estimate",
    "delayed": "the first refresh after k steps (Sophia's release) needs `every k`",
}

# Hyperparameter names that would clash with something else, and why. Inside
# generated functions a spec's names are prefixed by the backends, so only the
# places where a name is the API itself are listed: the constructor's arguments
# (curvc.names, shared with the emitter) and the words of the language.
_LANGUAGE_WORDS = ("true", "false", "optimizer", "hyper", "every")
RESERVED_WHY: dict[str, str] = {
    **{n: "every compiled optimizer already takes an argument of that name"
       for n in sorted(names.keyword_names() - {n for kws in names.STRUCTURE_KEYWORDS.values()
                                                for n, _ in kws})},
    "params": "every compiled optimizer already takes an argument of that name",
    "self": "it is the constructor's first argument",
    "step": "the step count t is read under that name",
    **{n: "it is a word of the curv language" for n in _LANGUAGE_WORDS},
}
RESERVED = frozenset(RESERVED_WHY)


def default(clause: str, form: str, arg: str) -> object:
    """The default of one argument of a form (``max_dim`` of ``structure kronecker``)."""
    return next(a.default for a in FORMS[clause][form].args if a.name == arg)
