"""How explain's text reads as Python: the translation of one line, its notes' meanings
and the statement it becomes (tests/_explained.py runs them)."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

# how explain names the source's estimate; each becomes E (what step(curvature=E) hands)
_SOURCE_PHRASES = (
    r"E_\{y ~ p\(y\|x\)\} \[g_y \* g_y\]",
    r"B \* grad L\(theta; y\^ ~ softmax\(logits\)\)\^2",
    r"z \* \(H z\),  z ~ \w+, mean of \w+ probes",
    r"diag\(grad\^2 f\(theta\)\)",
    # the dense structure's n x n matrices
    r"grad\^2 f\(theta\)",
    r"E_\{y ~ p\(y\|x\)\} \[g_y g_y\^T\]",
)

_DESCRIPTIVE = (
    r"the Newton step: the damped curvature, no root",
    r"clip length: per coordinate of the curvature's eigenbasis, the Newton step capped at "
    r"\S+ times the length's",
    r"before decay, curvature and momentum read it",  # the order of the lines says it
    r"the Newton step",
    r"clip length: in the curvature's eigenbasis, the Newton step capped at \S+ times the "
    r"length's",  # the line rotates into the eigenbasis itself
    r"\|\|d(_i)?\|\|_H = (g_i|1)",  # what the length means, shown by the lines
    r"H ~ F, the paper's NGD",
    r"V kept in the basis",  # the eigenbasis lines: the V lines run in the basis anyway
    r"after the step",  # the factors' lines: they follow the step's lines
    r"graft \w+",  # which pipeline d_g is: its lines say it
    r"decoupled decay joins the step", r"the momentum of the step",  # the lines' order says it
)


@dataclass
class Statement:
    target: str
    expr: str
    where: list[tuple[str, str]] = field(default_factory=list)  # (name, expr) first
    when: list = field(default_factory=list)  # predicates of (env) -> bool
    negate: str | None = None  # a flag: the value negated where it is set
    first: str | None = None  # the value at t = 1
    alternative: tuple[str, str] | None = None  # (hyper, expr): expr where hyper = 1
    refresh: bool = False  # runs on refresh steps only
    scopes: set = field(default_factory=set)  # the reductions the line may use
    pseudo_inverse: str | None = None  # divisions by this name are the pseudo-inverse
    zero_sum: bool = False  # a division by a sum's root is 0 where the sum is 0
    positive: str | None = None  # the value is 0 where this is not positive
    rounding_sign: bool = False  # sign() is 0 at rounding level of the largest entry
    corrects: tuple[str, str] | None = None  # (beta, what it divides): a bias correction
    zero_only: bool = False  # the pseudo-inverse's divisor gives 0 where it is 0 (not < 0)
    before_step: bool = False  # theta as it was before this step
    mode_exponent: object = None  # Kronecker: k -> each mode's root exponent, order k
    roots_every: str | None = None  # Kronecker: the roots' refresh period (a hyper)
    in_basis: bool = False  # the eigenbasis: not computed on the first step (no basis yet)
    scratch: bool = False  # its values only for the next line reading them (then restored)


class _Rewrite(ast.NodeTransformer):
    """Divisions as the line's notes define them."""

    def __init__(self, st: Statement):
        self.st = st

    def visit_Call(self, node):
        self.generic_visit(node)
        if getattr(node.func, "id", "") == "_if":  # only the branch taken is computed
            c, a, b = node.args
            node.args = [c] + [ast.Lambda(ast.arguments([], [], None, [], [], None, []), x)
                               for x in (a, b)]
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if not isinstance(node.op, ast.Div):
            return node
        right = node.right
        if self.st.pseudo_inverse and isinstance(right, ast.Name) \
                and right.id == self.st.pseudo_inverse:
            fn = "_div_or_zero" if self.st.zero_only else "_pinv"
            return ast.Call(ast.Name(fn, ast.Load()), [node.left, right], [])
        if self.st.zero_sum and any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "sum"
                                    for n in ast.walk(right)):
            return ast.Call(ast.Name("_div_or_zero", ast.Load()), [node.left, right], [])
        return node


def _python(text: str) -> str:
    for phrase in _SOURCE_PHRASES:
        text = re.sub(phrase, "E", text)
    text = text.replace("grad f(theta)", "_gradient")
    text = re.sub(r"\(hyperparameter (\w+)\)", r"_hyper_\1", text)  # a name explain also uses
    # the dense structure: matrix products written by juxtaposition, a spectral function
    text = text.replace("g g^T", "_outer(g)")
    # the factored structure: per tensor, means over the last dim (j) and the one before (i)
    text = text.replace("mean_j c_ij", "_rows(c)").replace("mean_i c_ij", "_cols(c)")
    text = re.sub(r"R C\^T / max\(mean_i R_i, ([^()]+)\)", r"_rank1(R, C, \1)", text)
    text = re.sub(r"^(.*) where (.*), else (.*)$", r"_where(\2, \1, \3)", text)
    text = re.sub(r"\blambda\b", "_lam", text)
    text = re.sub(r"max\|(\w+)\|", r"_amax(\1)", text)
    text = re.sub(r"Q diag\((\w+)\) Q\^T (\w+)", r"(Q @ (\1 * (Q.T @ \2)))", text)
    text = re.sub(r"Q diag\((\w+)\) sign\(Q\^T (\w+)\)", r"(Q @ (\1 * _sign0(Q.T @ \2)))",
                  text)
    # the Kronecker structure (tests/_explained_kronecker.py): modes' Gram matrices, roots
    text = text.replace("sum_r G_r G_r^T", "_gram_rows_first(G_r)")
    text = text.replace("sum_r G_r^T G_r", "_gram_rows_rest(G_r)")
    text = text.replace("G G^T", "_gram_first(G)").replace("G^T G", "_gram_rest(G)")
    text = re.sub(r"\bL\^-\d+/\d+ (\w+) R\^-\d+/\d+", r"_kron(L, \1, R)", text)
    text = re.sub(r"Q_L \[w_L\^-\d+/\d+ w_R\^-\d+/\d+ \* sign\(Q_L\^T (\w+) Q_R\)\] Q_R\^T",
                  r"_eigen_sign(Q_L, w_L, Q_R, w_R, \1)", text)
    text = text.replace("the eigenvectors and eigenvalues of L and R", "_eigens(L, R)")
    text = re.sub(r"Q\^T (\w+)", r"(Q.T @ \1)", text)
    text = re.sub(r"\bQ \(", "Q @ (", text)
    text = re.sub(r"\b(\w+)\^T (\w+)", r"(\1 @ \2)", text)
    text = re.sub(r"(\w+(?:\[\d+\])?) I\b", r"\1 * _I", text)
    text = re.sub(r"\bI\b", "_I", text)
    text = re.sub(r"\bif\(", "_if(", text)
    text = re.sub(r"\bold\((\w+)\)", r"_old_\1", text)
    text = re.sub(r"\bgiven\((\w+)\)", r"(\1 is not None)", text)
    text = re.sub(r"\|\|([^|]+)\|\|", r"_norm(\1)", text)
    text = re.sub(r"\|([^|]+)\|", r"abs(\1)", text)
    return text.replace("^", "**").replace(" mod ", " % ")


def _note(st: Statement, clause: str, period: dict) -> None:
    """What one note of a line means (a clause of its parentheses)."""
    clause = re.sub(r"\(hyperparameter (\w+)\)", r"\1", clause)  # conditions name hypers
    if clause == "negated when maximize=True":
        st.negate = "maximize"
    elif m := re.fullmatch(r"if not (\w+)", clause):
        st.when.append(lambda env, n=m[1]: not env[f"_hyper_{n}"])
    elif m := re.fullmatch(r"(?:only )?if (\w+)", clause):
        st.when.append(lambda env, n=m[1]: bool(env[f"_hyper_{n}"]))
    elif m := re.fullmatch(r"none where (\w+) = 0", clause):
        st.when.append(lambda env, n=m[1]: env[f"_hyper_{n}"] != 0)
    elif m := re.fullmatch(rf"{st.target}_0 = (.+), or 0 when (\w+) = 1", clause):
        period.setdefault("init", {})[st.target] = \
            f"{_python(m[1])} * (0.0 if _hyper_{m[2]} == 1 else 1.0)"
    elif m := re.fullmatch(rf"{st.target}_0 = (.+)", clause):
        period.setdefault("init", {})[st.target] = _python(m[1])
    elif m := re.fullmatch(rf"{st.target} = (.+) at t = 1", clause):
        st.first = _python(m[1])
    elif m := re.fullmatch(rf"{st.target} = (.+) when (\w+(?:\[\d+\])?) = 1", clause):
        st.alternative = (_python(m[2]), _python(m[1]))
    elif m := re.fullmatch(r"(?:estimated )?when t - 1 is a (positive )?multiple of (\w+)"
                           r"(?:, reused in between)?", clause):
        st.refresh = True
        new = (m[2], bool(m[1]))
        assert period.setdefault("every", new) == new, "two refresh periods in one step"
    elif clause in ("norm over all parameters", "sum over all parameters"):
        st.scopes.add("global")
    elif clause == "RMS over each tensor":
        st.scopes.add("tensor")
    elif clause == "RMS over each tensor, before this step":
        st.scopes.add("tensor")
        st.before_step = True
    elif m := re.fullmatch(r"0 where (\w+) is not positive: the pseudo-inverse", clause):
        st.pseudo_inverse = m[1]
    elif m := re.fullmatch(rf"state: {st.target} on the right is the stored value"
                           r"(?:, (.+) at t = 0)?", clause):
        if m[1]:
            period.setdefault("init", {})[st.target] = _python(m[1])
    elif clause == "V = 0 where that is 0" and st.target == "V":
        period["rank1_zero"] = True  # a zero mean of R gives V = 0, not 0/0
    elif m := re.fullmatch(r"d = 0 where (\w+) is 0", clause):
        period["zero_divisor"] = m[1]  # the step's later divisions by it
    elif clause == "sign 0 at rounding level of the largest entry":
        st.rounding_sign = True
    elif m := re.fullmatch(r"0 where (.+) is not positive", clause):
        st.positive = _python(m[1])
    elif clause == "d = 0 where the sum is 0":
        st.zero_sum = True
    elif m := re.fullmatch(r"order-k tensors: \^-1/(\(2k\)|k) per mode", clause):
        st.mode_exponent = (lambda k: 1 / (2 * k)) if m[1] == "(2k)" else (lambda k: 1 / k)
    elif m := re.fullmatch(r"roots recomputed every (\w+) steps", clause):
        st.roots_every = m[1]
    elif clause == "over all parameters: ||d||_P = 1":
        st.scopes.add("global")
    elif clause == "per layer":  # K-FAC's g line: the layers are the lines' own unit
        pass
    elif clause == "g = 0 where it is 0" and st.target == "g":  # K-FAC's normalized g
        st.zero_sum = True
    elif m := re.fullmatch(r"steps t < (\w+): the grafted step alone", clause):
        st.when.append(lambda env, n=_python(m[1]): env["step"] < eval(n, {}, env))
    elif clause == "norms over each block":
        st.scopes.add("block")
    elif clause == "norms over each tensor":
        st.scopes.add("tensor norm")
    elif clause == "for the roots only":  # Kronecker's bias correction: L, R stay as summed
        st.scratch = True
    elif clause == "sign 0 at rounding level":  # per tensor (_explained_kronecker.ROUNDING)
        pass
    elif not any(re.fullmatch(d, clause) for d in _DESCRIPTIVE):
        raise AssertionError(f"explain prints a note this test cannot execute: {clause!r}")
