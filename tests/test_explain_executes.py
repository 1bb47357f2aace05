"""`curvc explain` is executable: its equations, run as written, step as the compiled code.

For the elementwise structures (scalar and diagonal) the lines explain prints (every
generated module's header carries the same) are translated here mechanically into Python
over torch tensors and run beside the compiled optimizer for a few steps, from the same
gradients and curvature estimates; the parameters must agree to 1e-9 relative. The specs:
every accepted elementwise point of the language's cross product, the shipped specs
written in the axis vocabulary, the test hybrids, and flag variants of each.

How the text is read (the conventions a reader of explain needs too):

* every name is one value per coordinate of all parameters (here: one flat vector);
  a state starts at 0 unless a note gives its ``X_0``, and keeps its value between steps;
* ``grad`` is the raw gradient, ``E`` the curvature source's estimate (the phrase explain
  prints for it: a Fisher expectation, Hutchinson's z * (H z), ...), ``t`` the step;
* ``^`` is a power, ``|x|`` the absolute value, ``||x||``, ``sum`` and ``RMS`` reductions
  whose scope a note on the same line must state (nothing else defines it);
* each note in parentheses is either executed (``_note``: a condition, a refresh period,
  a first value, the pseudo-inverse, ...) or known to be descriptive; any other note fails
  the test, so explain cannot say something here that nothing checks;
* a line in the expression language (a spec's own ``let``, ``state``, ``momentum = ...``)
  reads as the language defines it (``curvc.language.EXPRESSION_NAMES`` and
  ``FUNCTIONS``): ``grad`` is g as it stands, ``param`` theta before the step,
  ``direction`` d, ``old(x)`` a state before the step, ``norm`` and ``rms`` per tensor,
  ``if(c, a, b)`` computes only the branch taken.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import curvc
from curvc import coverage, explain, resources, routing
from curvc.compiler import _load_cached

SHAPES = [(3, 4), (5,), (2, 1, 3)]
STEPS = 6
SPECS = Path(__file__).parent / "specs"

# how explain names the source's estimate; each becomes E (what step(curvature=E) hands)
_SOURCE_PHRASES = (
    r"E_\{y ~ p\(y\|x\)\} \[g_y \* g_y\]",
    r"B \* grad L\(theta; y\^ ~ softmax\(logits\)\)\^2",
    r"z \* \(H z\),  z ~ \w+, mean of \w+ probes",
    r"diag\(grad\^2 f\(theta\)\)",
)
SIGNED = ("hessian", "hutchinson")  # sources whose estimate takes either sign

_DESCRIPTIVE = (
    r"the Newton step: the damped curvature, no root",
    r"clip length: per coordinate of the curvature's eigenbasis, the Newton step capped at "
    r"\S+ times the length's",
    r"before decay, curvature and momentum read it",  # the order of the lines says it
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
            return ast.Call(ast.Name("_pinv", ast.Load()), [node.left, right], [])
        if self.st.zero_sum and any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "sum"
                                    for n in ast.walk(right)):
            return ast.Call(ast.Name("_div_or_zero", ast.Load()), [node.left, right], [])
        return node


def _python(text: str) -> str:
    for phrase in _SOURCE_PHRASES:
        text = re.sub(phrase, "E", text)
    text = text.replace("grad f(theta)", "_gradient")
    text = re.sub(r"\bif\(", "_if(", text)
    text = re.sub(r"\bold\((\w+)\)", r"_old_\1", text)
    text = re.sub(r"\bgiven\((\w+)\)", r"(\1 is not None)", text)
    text = re.sub(r"\|\|([^|]+)\|\|", r"_norm(\1)", text)
    text = re.sub(r"\|([^|]+)\|", r"abs(\1)", text)
    return text.replace("^", "**").replace(" mod ", " % ")


def _note(st: Statement, clause: str, period: dict) -> None:
    """What one note of a line means (a clause of its parentheses)."""
    if clause == "negated when maximize=True":
        st.negate = "maximize"
    elif m := re.fullmatch(r"if not (\w+)", clause):
        st.when.append(lambda env, n=m[1]: not env[n])
    elif m := re.fullmatch(r"(?:only )?if (\w+)", clause):
        st.when.append(lambda env, n=m[1]: bool(env[n]))
    elif m := re.fullmatch(r"none where (\w+) = 0", clause):
        st.when.append(lambda env, n=m[1]: env[n] != 0)
    elif m := re.fullmatch(rf"{st.target}_0 = (.+)", clause):
        period.setdefault("init", {})[st.target] = _python(m[1])
    elif m := re.fullmatch(rf"{st.target} = (.+) at t = 1", clause):
        st.first = _python(m[1])
    elif m := re.fullmatch(rf"{st.target} = (.+) when (\w+) = 1", clause):
        st.alternative = (m[2], _python(m[1]))
    elif m := re.fullmatch(r"(?:estimated )?when t - 1 is a (positive )?multiple of (\w+)"
                           r"(?:, reused in between)?", clause):
        st.refresh = True
        new = (m[2], bool(m[1]))
        assert period.setdefault("every", new) == new, "two refresh periods in one step"
    elif clause in ("norm over all parameters", "sum over all parameters"):
        st.scopes.add("global")
    elif clause == "RMS over each tensor":
        st.scopes.add("tensor")
    elif m := re.fullmatch(r"0 where (\w+) is not positive: the pseudo-inverse", clause):
        st.pseudo_inverse = m[1]
    elif m := re.fullmatch(rf"state: {st.target} on the right is the stored value"
                           r"(?:, (.+) at t = 0)?", clause):
        if m[1]:
            period.setdefault("init", {})[st.target] = _python(m[1])
    elif clause == "d = 0 where the sum is 0":
        st.zero_sum = True
    elif not any(re.fullmatch(d, clause) for d in _DESCRIPTIVE):
        raise AssertionError(f"explain prints a note this test cannot execute: {clause!r}")


def _statements(lines: list[str]) -> tuple[list[Statement], dict]:
    period: dict = {}
    out = []
    for line in lines:
        if line.startswith("        "):  # a note on the whole update
            m = re.fullmatch(r"\s+\((\w+) = (.+), the refreshes so far\)", line)
            assert m, f"explain prints a note this test cannot execute: {line.strip()!r}"
            period["count"] = (m[1], _python(m[2]))
            continue
        m = re.fullmatch(r"(\w+)\s*= (.*?)(?:\s{3,}\((.*)\))?", line)
        assert m, f"not an assignment: {line!r}"
        target, rhs, note = m[1], m[2], m[3]
        main, *where = rhs.split(",   ")
        st = Statement(target, _python(main))
        for w in where:
            name, expr = w.split(" = ", 1)
            st.where.append((name.strip(), _python(expr)))
        for clause in (note.split("; ") if note else ()):
            _note(st, clause, period)
        tree = _Rewrite(st).visit(ast.parse(st.expr, mode="eval"))
        st.expr = ast.unparse(ast.fix_missing_locations(tree))
        out.append(st)
    return out, period


def _eval(expr: str, scope: dict):
    # the names as globals: the lambdas of a lazy if() see them too
    return eval(expr, {"__builtins__": {}, **scope})  # noqa: S307 - explain's text, translated


class Explained:
    """An optimizer run from explain's text alone."""

    def __init__(self, lines: list[str], hypers: dict, shapes: list[tuple]):
        self.statements, self.period = _statements(lines)
        self.sizes = [torch.Size(s).numel() for s in shapes]
        self.h = hypers
        self.ndim = torch.cat([torch.full((n,), float(len(s)), dtype=torch.float64)
                               for n, s in zip(self.sizes, shapes)])
        self.env: dict = {}
        self.started = False

    @property
    def reads_estimate(self) -> bool:
        return any(re.search(r"\bE\b", st.expr) for st in self.statements)

    def refreshes(self, t: int) -> bool:
        if "every" not in self.period:
            return True
        k, delayed = self.period["every"]
        k = int(self.h[k])
        return (t - 1) % k == 0 and (t > 1 or not delayed)

    def _functions(self, st: Statement) -> dict:
        cuts = self.sizes

        def total(x):
            return x.sum() if torch.is_tensor(x) else x * sum(cuts)

        def rms(x):
            return torch.cat([p.pow(2).mean().sqrt().expand(p.numel())
                              for p in torch.split(x, cuts)])

        def both(f):
            return lambda a, b: f(torch.as_tensor(a, dtype=torch.float64),
                                  torch.as_tensor(b, dtype=torch.float64))
        def per_tensor(f):
            def each(x):
                x = torch.as_tensor(x, dtype=torch.float64).expand(sum(cuts))
                return torch.cat([f(p).expand(p.numel()) for p in torch.split(x, cuts)])
            return each

        def choose(c, a, b):
            if not torch.is_tensor(c) or c.dim() == 0:
                return a() if bool(c) else b()
            return torch.where(c, torch.as_tensor(a()), torch.as_tensor(b()))

        def scalar(f):
            return lambda x: f(torch.as_tensor(x, dtype=torch.float64))
        fns = dict(sqrt=scalar(torch.sqrt), sign=scalar(torch.sign), abs=scalar(torch.abs),
                   exp=scalar(torch.exp), log=scalar(torch.log), clamp=torch.clamp,
                   max=both(torch.maximum), min=both(torch.minimum),
                   lerp=lambda a, b, w: a + w * (b - a), _if=choose,
                   # the expression language's reductions: one per parameter tensor
                   norm=per_tensor(lambda p: p.pow(2).sum().sqrt()),
                   rms=per_tensor(lambda p: p.pow(2).mean().sqrt()),
                   _pinv=lambda a, b: torch.where(b > 0, a / b, 0.0),
                   _div_or_zero=lambda a, b: torch.where(b != 0, a / b, 0.0))
        if "global" in st.scopes:
            fns.update(sum=total, _norm=lambda x: total(x * x).sqrt())
        if "tensor" in st.scopes:
            fns["RMS"] = rms
        return fns

    def step(self, t: int, theta, grad, estimate) -> torch.Tensor:
        env = self.env
        if not self.started:
            self.started = True
            zero = torch.zeros_like(theta)
            for st in self.statements:
                env.setdefault(st.target, zero)
            env.setdefault("d", zero)
            env.update(self.h)
            for name, expr in self.period.get("init", {}).items():
                env[name] = zero + _eval(expr, {**env, **self._functions(Statement("", ""))})
        env.update(t=t, step=t, theta=theta, param=theta, _gradient=grad, ndim=self.ndim)
        for st in self.statements:  # old(x): x as stored before this step
            env[f"_old_{st.target}"] = env[st.target]
        env.pop("E", None)
        refresh = self.refreshes(t)
        if refresh and estimate is not None:
            env["E"] = estimate
        if "count" in self.period:
            name, expr = self.period["count"]
            env[name] = _eval(expr, env)
        for st in self.statements:
            if (st.refresh or re.search(r"\bE\b", st.expr)) and not refresh:
                continue
            if not all(w(env) for w in st.when):
                continue
            # the expression language's names for the step's values as they stand
            scope = {**env, **self._functions(st), "grad": env["g"], "direction": env["d"]}
            for name, expr in st.where:
                scope[name] = _eval(expr, scope)
            expr = st.expr
            if st.first is not None and t == 1:
                expr = st.first
            elif st.alternative is not None and self.h[st.alternative[0]] == 1:
                expr = st.alternative[1]
            try:
                value = _eval(expr, scope)
            except TypeError:  # a let of an optional hyperparameter that is None: unset
                assert any(v is None for v in self.h.values()), expr
                value = None
            if st.negate and env[st.negate]:
                value = -value
            env[st.target] = value
        return env["theta"]


# --- the specs ------------------------------------------------------------------

def _cross_product() -> list[tuple[str, str, dict]]:
    out = []
    for spec in coverage.cross_product():
        if spec.forms["structure"] not in ("scalar", "diagonal"):
            continue
        if coverage.classify(spec).key == coverage.ACCEPTED:
            out.append((spec.label, spec.source, {}))
    return out


# every shipped elementwise spec and the test hybrids, with flag variants
VARIANTS = {
    "sgd": [dict(), dict(momentum=0.9, dampening=0.1, weight_decay=0.1),
            dict(momentum=0.9, nesterov=True, maximize=True)],
    "sign_gd": [dict(momentum=0.8, weight_decay=0.1, maximize=True)],
    "normalized_gd": [dict(), dict(maximize=True)],
    "adam": [dict(), dict(amsgrad=True, weight_decay=0.1, maximize=True, eps=0.3),
             dict(decoupled_weight_decay=True, weight_decay=0.1, amsgrad=True)],
    "adamw": [dict(amsgrad=True, weight_decay=0.1)],
    "adagrad": [dict(), dict(lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2,
                             maximize=True, eps=0.3)],
    "adahessian": [dict(), dict(update_each=2, hessian_power=0.5, weight_decay=0.1, eps=0.3)],
    "sophia": [dict(k=2), dict(k=3, weight_decay=0.0, maximize=True)],
    "sophia_h": [dict(update_period=2), dict(update_period=3, weight_decay=0.1, eps=0.3)],
    "fisher_adam": [dict()],
    "sign_adagrad": [dict()],
    "diagonal_ngd": [dict()],
    "diagonal_normalized_ngd": [dict()],
    "diagonal_clipped_ngd": [dict()],
    "diagonal_gn_normalized_ngd": [dict()],
    "diagonal_gn_clipped_ngd": [dict()],
    "diagonal_eigenbasis_normalized_ngd": [dict()],
    "diagonal_eigenbasis_clipped_ngd": [dict()],
    # the expression specs (flags both ways, old(), a product state, optional hypers)
    "rmsprop": [dict(), dict(centered=True, momentum=0.9, weight_decay=0.1, maximize=True)],
    "adadelta": [dict(), dict(weight_decay=0.1, maximize=True)],
    "adamax": [dict(), dict(weight_decay=0.1, maximize=True)],
    # betas far from 1: under the sign, old(exp_avg) and exp_avg then differ somewhere
    "lion": [dict(), dict(weight_decay=0.1, maximize=True, betas=(0.5, 0.2))],
    "lamb": [dict(), dict(weight_decay=0.1, grad_averaging=False, maximize=True)],
    "lars": [dict(), dict(nesterov=True, weight_decay=0.1, dampening=0.1),
             dict(momentum=0.0, weight_decay=0.1)],
    "radam": [dict(), dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)],
    "nadam": [dict(weight_decay=0.1), dict(decoupled_weight_decay=True, weight_decay=0.1,
                                           maximize=True)],
    "adabelief": [dict(weight_decay=0.1), dict(rectify=True, ams_bound=True, maximize=True),
                  dict(rectify=True, degenerated_to_sgd=False, weight_decouple=False,
                       weight_decay=0.1)],
    "adan": [dict(weight_decay=0.1), dict(weight_decouple=True, weight_decay=0.1,
                                          maximize=True), dict(max_grad_norm=0.5)],
    "ademamix": [dict(weight_decay=0.1), dict(weight_decouple=True, weight_decay=0.1,
                                              maximize=True),
                 dict(t_alpha_beta3=3.0, weight_decouple=True, fixed_decay=True,
                      weight_decay=0.1)],
    "every_keep_max_pow": [dict(), dict(power=0.5, k=3, amsgrad=True, maximize=True)],
    "sign_fisher_clip": [dict(), dict(max_norm=0.0)],
    "sum_normalized_hb": [dict(), dict(momentum=0.0, lr_decay=0.1, weight_decay=0.1)],
}


def _named() -> list[tuple[str, str, dict]]:
    shipped = resources.shipped_specs()
    out = []
    for name, variants in VARIANTS.items():
        path = SPECS / f"{name}.curv" if (SPECS / f"{name}.curv").exists() else shipped[name]
        for i, hypers in enumerate(variants):
            out.append((f"{name}-{i}", path.read_text(), hypers))
    return out


CASES = _named() + _cross_product()


def test_every_shipped_elementwise_spec_is_executed_here():
    for name, path in resources.shipped_specs().items():
        opt = curvc.to_ir(path.read_text())
        if not routing.is_routed(opt) and opt.structure.kind in ("scalar", "diagonal"):
            assert name in VARIANTS, name


@pytest.mark.parametrize("label,source,hypers", CASES, ids=[c[0] for c in CASES])
def test_explain_computes_what_the_code_computes(label, source, hypers):
    opt_ir = curvc.to_ir(source)
    cls = _load_cached(source, f"<{label}>", "torch")
    gen = torch.Generator().manual_seed(sum(map(ord, label)))
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
              for s in SHAPES]
    sizes = [p.numel() for p in params]
    opt = cls(params, **hypers)
    h = dict(opt.param_groups[0])
    h.pop("params")
    # the flags a spec does not name are off (maximize, ...) unless set
    lines = explain.equations(opt_ir, curvc.to_plan(opt_ir))
    run = Explained(lines, h, SHAPES)
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    signed = opt_ir.curvature.kind in SIGNED
    for t in range(1, STEPS + 1):
        grad = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        grad[::5] = 0.0  # coordinates the step has not seen: the pseudo-inverse's case
        estimate = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        estimate = estimate if signed else estimate.abs()
        estimate[1::6] = 0.0
        for p, g in zip(params, torch.split(grad, sizes)):
            p.grad = g.reshape(p.shape).clone()
        wants = opt.wants_curvature()
        if run.reads_estimate:  # the steps that take an estimate are the ones explain says
            assert wants == run.refreshes(t), f"step {t}: refresh {wants} in the code"
        if wants:
            opt.step(curvature=[e.reshape(p.shape) for p, e in
                                zip(params, torch.split(estimate, sizes))])
        else:
            opt.step()
        # each step from the code's parameters, the states each side's own: the step
        # itself is compared (to its own size), and a state explain gets wrong shows in
        # a later step
        want = run.step(t, theta, grad, estimate if wants else None) - theta
        got = torch.cat([p.detach().reshape(-1) for p in params])
        scale = max(want.abs().max().item(), 1e-300)
        err = (got - theta - want).abs().max().item()
        assert err <= 1e-9 * scale, (
            f"step {t}: the code's step and explain's differ by {err:.3g} "
            f"(the step's size {scale:.3g})\n" + "\n".join(lines))
        theta = got.clone()
