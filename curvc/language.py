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

# basis = eigen: the spec's diagonal pipeline (iterate, length, damping) runs in the
# eigenbasis of the factors, EMAs with factor_beta, refreshed every k steps by `refresh`
# (power_qr: one power-iteration step and a QR; eigh); there merge_dims (below) is SOAP's
# merge of adjacent small dims (layout: a 4-D tensor's NCHW or NHWC); vectors = false gives
# a 1-D tensor no factor (SOAP's precondition_1d)
_EIGENBASIS = (ArgSpec("basis", "enum", "none", choices=("none", "eigen")),
               ArgSpec("factor_beta", "number", 0.95, "unit"),
               ArgSpec("refresh", "enum", "power_qr", choices=("power_qr", "eigh")),
               ArgSpec("vectors", "bool", True),
               # how a 4-D tensor's dims are laid out for merge_dims: NCHW, or NHWC (whose
               # channels are moved to dim 1 before merging), a word a hyperparameter may give
               ArgSpec("layout", "enum", "channels_first",
                       choices=("channels_first", "channels_last"), by_hyper=True))
EIGENBASIS_ARGS = tuple(a.name for a in _EIGENBASIS)
# Distributed Shampoo's handling of large tensors (Shi et al. 2023): `block` splits every
# mode longer than max_dim into blocks of max_dim (each block its own factors) instead of
# leaving that mode without one; `merge_dims` first drops size-1 dims and merges adjacent
# dims (from the last) while their product stays <= max_dim (a 4 x 8 weight: one 32-vector)
_BLOCKING = (ArgSpec("block", "bool", False), ArgSpec("merge_dims", "bool", False))
# Distributed Shampoo's inv_root_override: each factor of a block of order k is raised to
# -power/factor_root instead of -power/(2k) (0, the default: 2k)
_FACTOR_ROOT = ArgSpec("factor_root", "int", 0.0, "nonneg")

# Grafting: where the step's per-block norm comes from (a block of a blocked Kronecker
# tensor, else the whole tensor). `start`: before that step the grafted step alone is taken
# (Distributed Shampoo's start_preconditioning_step; the roots are computed from then on).
_START = ArgSpec("start", "int", 1.0, "count_every")
_GRAFT_EPS = ArgSpec("eps", "number", 1e-10, "positive")

_ADJUST = ArgSpec("adjust", "enum", "none", choices=("none", "original", "match_rms_adamw"),
                  by_hyper=True)

_BETA = lambda name="beta": ArgSpec(name, "number", constraint="unit")  # noqa: E731
# Which parameters a norm is taken over: each tensor on its own, the tensors of one
# param group, or every parameter of the optimizer (the default).
_SCOPE = ArgSpec("scope", "enum", "global", choices=("global", "group", "tensor"))
# What a clip acts on: the finished step d, or the gradient g before anything reads it
# (torch.nn.utils.clip_grad_norm_ / clip_grad_value_ ahead of the step). A spec may
# have one clip of each.
_ON = ArgSpec("on", "enum", "step", choices=("step", "gradient"))
# What a momentum averages: the gradient g, the value the preconditioner divides (the
# default), or the finished step d, after the preconditioner, graft, clip and decoupled
# decay (Distributed Shampoo's momentum and use_nesterov). A spec may have one of each.
_MOMENTUM_ON = ArgSpec("on", "enum", "gradient", choices=("gradient", "step"))

# Decoupled decay not scaled by lr, theta <- theta*(1 - wd) (pytorch_optimizer's fixed_decay)
_FIXED = ArgSpec("fixed", "bool", False)

# Each form's comment is the math it stands for (README's language table says more).
FORMS: dict[str, dict[str, FormSpec]] = {
    "curvature": {
        "constant": FormSpec(),  # L*I, the a-priori smoothness constant (folded into lr)
        # F~ = E_data[g g^T]; its diagonal is g*g. `of = NAME`: the outer product of a
        # named vector instead of g (a let or state: Muon's momentum, AdaBelief's g - m)
        "empirical_fisher": FormSpec((ArgSpec("of", "expr", "grad"),)),
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
                               *_NEWTON_SCHULZ, *_EIGENBASIS, *_BLOCKING, _FACTOR_ROOT),
                              modifiers=("every",)),
        "dense": FormSpec(),  # the whole n x n matrix
        # diag(V) with V = R C^T / max(mean(R), eps): the rank-1 outer product of the row and
        # column means of the estimate over a tensor's last two dims (Adafactor); order < 2
        # keeps the plain diagonal
        "factored": FormSpec((ArgSpec("eps", "number", 0.0, "nonneg"),)),
        "low_rank": FormSpec(),  # rank-2 updates from the secant pairs (iterate secant)
    },
    "iterate": {
        "instant": FormSpec(modifiers=("every",)),  # the current estimate only
        "ema": FormSpec((_BETA(), ArgSpec("keep_max", "bool", False)),  # C <- beta*C + (1-beta)*c
                        modifiers=("bias_corrected", "every", "delayed")),
        # C <- beta_t*C + (1-beta_t)*c with beta_t = 1 - t^decay, t the refreshes so far
        # (Adafactor's beta2 schedule; beta_1 = 0, so no zero start to bias-correct)
        "power_ema": FormSpec((ArgSpec("decay", "number", constraint="nonpos"),),
                              modifiers=("every", "delayed")),
        # Distributed Shampoo's betas[1]: an EMA (bias-corrected if asked) for beta < 1,
        # the plain sum C <- C + c at beta = 1
        "ema_or_sum": FormSpec((ArgSpec("beta", "number", constraint="unit_closed"),),
                               modifiers=("bias_corrected", "every")),
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
        # ||d||_P = eps: d = P^-1 g / sqrt(g^T P^-1 g), the sum over the scope's tensors
        "normalized": FormSpec((_SCOPE,)),
        "eigen_sign": FormSpec(),  # ||d_i||_P = eps: d = P^-1/2 Q sign(Q^T g) (sign GD)
    },
    "clip": {
        "none": FormSpec(),
        # d <- d * min(1, C/(||d|| + eps)), ||d|| over the scope's tensors (on = gradient: g);
        # C = 0: no clip (pytorch_optimizer's max_grad_norm = 0)
        "global_norm": FormSpec((ArgSpec("threshold", "number", constraint="nonneg"),
                                 _SCOPE, _ON, ArgSpec("eps", "number", 0.0, "nonneg"))),
        # d_i = clamp(d_i, -threshold, threshold) (Sophia; on = gradient: g_i)
        "elementwise": FormSpec((ArgSpec("threshold", "number", constraint="positive"), _ON)),
        # d <- d / max(1, RMS(d)/threshold), RMS over each tensor (Adafactor's update clip)
        "tensor_rms": FormSpec((ArgSpec("threshold", "number", constraint="positive"),)),
        # the length limitation relaxed to a bound (the paper's clipped NGD variants): in the
        # curvature's eigenbasis, each component of the Newton step n = P^-1 g capped at C
        # times the length's step d_L, d_i = sign(n_i) min(|n_i|, C |d_L,i|): for a length
        # with d_L = n * s, d = n * min(1, C s), so ||d||_P <= C eps where the length fixes eps
        "length": FormSpec((ArgSpec("threshold", "number", constraint="positive"),)),
    },
    "momentum": {
        "none": FormSpec(),
        # m <- beta*m + (1-beta)*g
        "ema": FormSpec((_BETA(), _MOMENTUM_ON), modifiers=("bias_corrected",)),
        # b <- beta*b + (1-dampening)*g (b = g on the first step)
        "heavy_ball": FormSpec((_BETA(), ArgSpec("dampening", "number", 0.0, "unit_closed"),
                                ArgSpec("nesterov", "bool", False), _MOMENTUM_ON)),
    },
    "decay": {
        "none": FormSpec(),
        # g <- g + wd*theta (decoupled = true: as `decay decoupled`)
        "l2": FormSpec((ArgSpec("rate", "number", constraint="nonneg"),
                        ArgSpec("decoupled", "bool", False), _FIXED)),
        # theta <- theta*(1 - lr*wd); fixed = true: theta*(1 - wd), lr not read
        "decoupled": FormSpec((ArgSpec("rate", "number", constraint="nonneg"), _FIXED)),
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
        # the relative step: lr_t = min(lr, 1/sqrt(t)) * max(eps, RMS(theta)) per tensor
        # (Adafactor); weight decay keeps lr
        "relative_step": FormSpec((ArgSpec("eps", "number", constraint="nonneg"),)),
    },
    # The direction d the structure computes, rescaled per block to the norm of another
    # pipeline's step on the same momentum m: d * ||d_g|| / (||d|| + 1e-16). d_g: sgd m;
    # adagrad m / (sqrt(V) + eps), V <- V + g^2; rmsprop the same with V <- beta V +
    # (1 - beta) g^2; adam the same V, bias-corrected: m / (sqrt(V / (1 - beta^t)) + eps)
    "graft": {
        "none": FormSpec(),
        "sgd": FormSpec((_START,)),
        "adagrad": FormSpec((_GRAFT_EPS, _START)),
        "rmsprop": FormSpec((_BETA(), _GRAFT_EPS, _START)),
        "adam": FormSpec((_BETA(), _GRAFT_EPS, _START)),
    },
}

# Clauses whose value may be written as an expression, ``CLAUSE = EXPR``, and what the
# expression stands for (``update = EXPR`` is not a column: it replaces the direction d
# in theta <- theta - lr * update).
EXPRESSION_CLAUSES = {
    "curvature": "the elementwise curvature estimate c, then iterated, rooted and damped",
    "momentum": "the direction m that the preconditioner divides",
    "update": "what multiplies the learning rate: theta <- theta - lr * update",
}

# The names every expression may read, besides hyperparameters, lets and states.
EXPRESSION_NAMES = {
    "grad": "the gradient g (after maximize and coupled weight decay)",
    "param": "the parameter theta before this step",
    "step": "the step count t (1 on the first step)",
    # a host value per tensor: `if(ndim > 1, ...)` treats matrices and vectors apart (LARS)
    "ndim": "the parameter tensor's number of dimensions (0 for a scalar)",
    "direction": "the preconditioned, length-limited and clipped direction d",
}

# Functions of the expression language: arity and meaning. ``if``'s condition is
# decided on the host once per step (a hyperparameter flag, or a comparison of
# hyperparameters and step), so it never branches per coordinate.
FUNCTIONS: dict[str, tuple[int, str]] = {
    "sqrt": (1, "square root"), "abs": (1, "absolute value"), "sign": (1, "sign (0 at 0)"),
    "exp": (1, "exponential e^x"), "log": (1, "natural logarithm (x > 0)"),
    "max": (2, "elementwise maximum"), "min": (2, "elementwise minimum"),
    "lerp": (3, "lerp(a, b, w) = a + w * (b - a)"),
    "if": (3, "if(condition, then, else), the condition a host value"),
    "old": (1, "a state's stored value, before this step's update"),
    "given": (1, "given(NAME): whether the optional hyperparameter NAME (`hyper NAME = none`) "
                 "is not None, as the whole condition of an if()"),
    "norm": (1, "the Euclidean norm of the whole tensor (one per parameter tensor)"),
    "rms": (1, "the root mean square of the whole tensor, norm(x) / sqrt(numel)"),
}
# Operators, by precedence (low to high): comparison, + -, * /, unary -, ^.
OPERATORS = {"op+": "+", "op-": "-", "op*": "*", "op/": "/", "op^": "^",
             "op>": ">", "op<": "<", "op>=": ">=", "op<=": "<="}
_PRECEDENCE = {"op>": 1, "op<": 1, "op>=": 1, "op<=": 1, "op+": 2, "op-": 2, "op*": 3,
               "op/": 3, "neg": 4, "op^": 5}


def show_apply(e) -> str:
    """An IR expression in the spec's own syntax, parenthesized only where needed."""
    def show(x, outer: int = 0, right: bool = False) -> str:
        fn = getattr(x, "fn", None)
        if fn is None:
            return str(x)
        if fn in OPERATORS or fn == "neg":
            p = _PRECEDENCE[fn]
            if fn == "neg":
                text = "-" + show(x.args[0], p)
            else:
                a, b = x.args
                # ^ is right-associative; the others are left-associative
                left_p, right_p = (p + 1, p) if fn == "op^" else (p, p + 1)
                text = f"{show(a, left_p)} {OPERATORS[fn]} {show(b, right_p)}"
            return f"({text})" if p < outer else text
        return f"{fn}({', '.join(show(a) for a in x.args)})"
    return show(e)


# The clauses, in the order of Table 1's columns and then the step's terms: the
# IR's axes (``ir.AXIS_TYPES``) and the parser's list of clause keywords.
CLAUSES: tuple[str, ...] = tuple(FORMS)

DEFAULT_FORMS = {"iterate": "instant", "clip": "none", "momentum": "none", "decay": "none",
                 "damping": "none", "schedule": "constant", "graft": "none"}
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

# Modifiers that may take a boolean, `bias_corrected(use_bias_correction)`: a hyperparameter
# turns it on or off on the host each step (no recompile), a literal in the spec.
MODIFIER_SWITCHES = {"bias_corrected": ArgSpec("bias_corrected", "bool")}

# Hyperparameter names that would clash with something else, and why. Inside
# generated functions a spec's names are prefixed by the backends, so only the
# places where a name is the API itself are listed: the constructor's arguments
# (curvc.names, shared with the emitter) and the words of the language.
_LANGUAGE_WORDS = ("true", "false", "optimizer", "hyper", "every", "machine_eps", "none")

# A hyperparameter default (or tuple entry) that means the parameter dtype's machine epsilon,
# torch.finfo(dtype).eps: the constructor's default there is None (torch.optim.Adafactor's
# eps), and None, given or defaulted, is resolved per dtype at step time.
MACHINE_EPS = "machine_eps"
# A hyperparameter default that means "not given": the constructor's default is None, and
# only given(NAME) reads it (AdEMAMix's t_alpha_beta3 = None, no warmup).
NONE = "none"
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
