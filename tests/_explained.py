"""Explain's printed equations, run: the reader tests/test_explain_executes.py uses.

``Explained(lines, hypers, shapes).step(t, theta, grad, estimate)`` runs one step of
the lines ``curvc.explain.equations`` prints, translated mechanically into Python over
torch tensors (flat vectors over all parameters; H an n x n matrix); the conventions
are the test module's docstring's.
"""
from __future__ import annotations

import ast
import re

import torch
from _explained_eigen import Eigen, eigen_note, eigen_statements, in_basis, primed
from _explained_factored import factored, factored_sizes
from _explained_graft import block_norm, blocks, graft_note, graft_statements
from _explained_polar import Polar, polar_note, polar_statements
from _explained_kfac import KFAC, KFAC_NOTES, kfac_statements, mean_outer, t_sum_outer
from _explained_kronecker import (SAMPLED, SAMPLED_NOTES, Identity, Kronecker, Modes,
                                  damped_kronecker)
from _explained_text import Statement, _note, _python, _Rewrite


def _statements(lines: list[str]) -> tuple[list[Statement], dict]:
    period: dict = {}
    out = []
    for line in lines:
        if line.startswith("        "):  # a note on the whole update
            if line in KFAC_NOTES or line in SAMPLED_NOTES:
                continue
            if m := re.fullmatch(r"\s+\(each row times sqrt\((\S+)\)\)", line):
                period["row_scale"] = m[1]  # Explained.sampled's rows carry it
                continue
            if period.get("kronecker") and re.fullmatch(
                    r"\s+g unfolded along mode i \(modes longer than max_dim keep none\)", line):
                continue  # the G line's second half (SHAPES' modes are all short)
            if re.fullmatch(r"\s+\(a factor that starts at 0: each eigenvalue within n eps of "
                            r"its largest is 0,", line):
                period["kron_rounding"] = "opened"
                continue
            if period.get("kron_rounding") == "opened" and re.fullmatch(
                    r"\s+n the factor's size and eps its precision's\)", line):
                period["kron_rounding"] = True  # _explained_kronecker.at_rounding
                continue
            if m := re.fullmatch(r"\s+\((\w+) = (.+), the refreshes so far\)", line):
                period["count"] = (m[1], _python(m[2]))
                continue
            if re.fullmatch(r"\s+\(a tensor of order k >= 2 is factored over its last two "
                            r"dims, m x n;", line):
                period["factored"] = "opened"
                continue
            if period.get("factored") == "opened" and re.fullmatch(
                    r"\s+order < 2 keeps the diagonal, as Adafactor does: V = the accumulated "
                    r"c\)", line):
                period["factored"] = True  # R holds the accumulated c of an order < 2 tensor
                continue
            if m := re.fullmatch(r"\s+\(no correction at (\S+) = 1, a sum\)", line):
                period["uncorrected"] = m[1]  # a bias correction by 1 - beta^t is skipped
                continue
            if eigen_note(line, period) or graft_note(line, period) or \
                    polar_note(line, period):  # their modules
                continue
            assert re.fullmatch(r"\s+\(N the number of parameters, eps64 = 2\^-52: the "
                                r"pseudo-inverse drops eigenvalues at rounding level or "
                                r"below\)", line), \
                f"explain prints a note this test cannot execute: {line.strip()!r}"
            period["constants"] = True  # N and eps64, bound for the whole step
            continue
        def statement(target, expr, basis=None):
            return Statement(target, expr, in_basis=in_basis(target) if basis is None
                             else basis)
        if (eig := eigen_statements(line, period, statement)) is not None:
            out += eig  # tests/_explained_eigen.py
            continue
        if (cut := graft_statements(line, period, statement)) is not None:
            out += cut  # tests/_explained_graft.py
            continue
        if (polar := polar_statements(line, period, statement)) is not None:
            out += polar  # tests/_explained_polar.py
            continue
        if "eigen" in period:
            line = primed(line)
        m = re.fullmatch(r"(\w+(?:, \w+)*)\s*= (.*?)(?:\s{3,}\((.*)\))?", line)
        assert m, f"not an assignment: {line!r}"
        target, rhs, note = m[1], m[2], m[3]
        if (kfac := kfac_statements(line, period)) is not None:  # tests/_explained_kfac.py
            for target, expr, every in kfac:
                out.append(Statement(target, expr, roots_every=every))
            continue
        if rows := SAMPLED.get(line):  # the rows the caller samples (Explained.sampled)
            period["sampled"] = rows
            out.append(Statement("G_r", "_sampled"))
            continue
        if rhs.startswith("g as a matrix; an order-k tensor has one factor per mode i, "
                          "from G_(i),"):
            period["kronecker"] = True
            out.append(Statement("G", "g"))
            continue
        note = note.replace(")   (", "; ") if note else note  # two notes, one line
        main, *where = rhs.split(",   ")
        main = main.split(" = ")[-1]  # A = B: the last member is the one to compute
        damped = damped_kronecker(main) if period.get("kronecker") else None
        st = statement(re.sub(r"\blambda\b", "_lam", target), damped or _python(main))
        st.in_basis = st.in_basis and "eigen" in period
        parts = [re.fullmatch(r"(.*) / \(1 - (\S+)\^\w+\)", x) for x in main.split(", ")]
        if "," in target and all(parts):  # L, R = L / (1 - b^t), R / (1 - b^t): both
            st.corrects = (parts[0][2], ", ".join(_python(c[1]) for c in parts))
        elif c := re.fullmatch(r"(.*) / \(1 - (\S+)\^\w+\)", main):  # a bias correction
            st.corrects = (c[2], _python(c[1]))
        for w in where:
            name, expr = w.split(" = ", 1)
            st.where.append((name.strip(), _python(expr)))
        clauses = note.split("; ") if note else []
        if period.get("kfac"):  # K-FAC joins its notes with ", "
            clauses = [c for cl in clauses for c in
                       re.split(r", (?=[AS]_0 = |when t - 1 |[AS] = )", cl)]
        for clause in clauses:
            _note(st, clause, period)
        if st.pseudo_inverse is None and period.get("zero_divisor") and st.target != "P":
            st.pseudo_inverse, st.zero_only = period["zero_divisor"], True
        if "_kron(" in st.expr or "_eigen_sign(" in st.expr:  # the matrix's p is order 2's
            p = re.search(r"\^-(\d+)/(\d+)", main)
            assert st.mode_exponent and st.mode_exponent(2) == int(p[1]) / int(p[2]), line
        tree = _Rewrite(st).visit(ast.parse(st.expr, mode="eval"))
        st.expr = ast.unparse(ast.fix_missing_locations(tree))
        out.append(st)
    return out, period


def _eval(expr: str, scope: dict):
    # the names as globals: the lambdas of a lazy if() see them too
    return eval(expr, {"__builtins__": {}, **scope})  # noqa: S307 - explain's text, translated


class Explained:
    """An optimizer run from explain's text alone."""

    def __init__(self, lines: list[str], hypers: dict, shapes: list[tuple],
                 layers: list[tuple[int, int]] | None = None):
        """``layers``: K-FAC's, the (out, in) of each Linear, whose weight and bias are
        the parameters (``shapes``) in order."""
        self.statements, self.period = _statements(lines)
        self.layers = layers or []
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [torch.Size(s).numel() for s in shapes]
        self.h = hypers
        self.ndim = torch.cat([torch.full((n,), float(len(s)), dtype=torch.float64)
                               for n, s in zip(self.sizes, shapes)])
        self.env: dict = {}
        self.started = False
        self.kron = Kronecker(self.shapes)
        self.tensor_index = [torch.arange(sum(self.sizes[:i]), sum(self.sizes[:i + 1]))
                             for i in range(len(self.sizes))]
        self.block_index = self.tensor_index  # the tensors, unless cut into blocks
        if "blocks" in self.period:  # Distributed Shampoo's merged, cut tensors
            cut = self.period["blocks"]

            def value(text):
                return float(_eval(_python(text), hypers))
            merge = cut.get("merge") and (cut.get("merge_if") is None or hypers[cut["merge_if"]])
            block = "block" in cut and (cut["block_if"] is None or hypers[cut["block_if"]])
            self.block_index, shapes = blocks(self.shapes, value(cut["merge_max"]) if merge
                                              else None, value(cut["block"]) if block else None)
            self.kron = Kronecker(shapes, self.block_index)
        self.kfac = KFAC(self.layers, self.sizes)
        self.kfac_from_zero = False
        self.polar = Polar(self.shapes, self.period, hypers)
        self.eigen = Eigen(self.shapes, self.period.get("eigen", {}),
                           lambda text: float(_eval(_python(text), self.env)), hypers)

    @property
    def reads_estimate(self) -> bool:
        return any(re.search(r"\bE\b", st.expr) for st in self.statements)

    def refreshes(self, t: int) -> bool:
        if "every" not in self.period:
            return True
        k, delayed = self.period["every"]
        k = int(self.h[k])
        return (t - 1) % k == 0 and (t > 1 or not delayed)

    def _kronecker(self, st: Statement) -> dict:
        kron = self.kron

        def number(text):
            return float(_eval(_python(text), self.env))
        kron.rounding = self.period.get("kron_rounding") is True and self.kron.from_zero
        every = st.roots_every
        t = self.env.get("step", 1)
        refresh = every is None or (t - 1) % int(self.h[every]) == 0
        if "roots_from" in self.period:  # on step S, then the multiples of k after it
            start, k = (int(number(x)) for x in self.period["roots_from"])
            refresh = t == start or (t > start and t % k == 0)
        exponent, printed = st.mode_exponent, True
        if "root_override" in self.period and number(self.period["root_override"][1]) > 0:
            p, r = self.period["root_override"]
            exponent, printed = (lambda k: number(p) / number(r)), False
        return dict(_gram_first=kron.gram(True), _gram_rest=kron.gram(False), _I=Identity(),
                    _gram_rows_first=kron.gram_rows(True), _gram_rows_rest=kron.gram_rows(False),
                    _kron=kron.preconditioned(st.mode_exponent, refresh), _eigens=kron.eigens,
                    _kron_f=kron.spectral(exponent, refresh, number, printed),
                    _eigen_sign_f=kron.eigen_sign_f(exponent, number),
                    _eigen_sign=kron.eigen_sign(st.mode_exponent))

    def _kfac(self, st: Statement) -> dict:
        every = st.roots_every
        t = self.env.get("step", 1)
        refresh = every is None or (t - 1) % int(self.h[every]) == 0

        def number(text):
            return float(_eval(_python(text), self.env))

        def step(s, a, g, left, right, sign):
            return self.kfac.step(refresh, number, sign)(s, a, g, left, right)
        self.kfac.rounding = self.period.get("kron_rounding") is True and self.kfac_from_zero
        return dict(_kfac=step, _mean_outer=mean_outer, _t_sum_outer=t_sum_outer, _I=Identity())

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
        n = sum(cuts)
        rounding = 1e-10  # generous: what is at rounding level in float64 is far below it

        def sign0(x):
            return torch.sign(torch.where(x.abs() > rounding * x.abs().max(), x, 0.0))

        def eigh(a):
            w, q = torch.linalg.eigh(a)
            return q, w
        fns = dict(_outer=lambda v: torch.outer(v, v), _I=torch.eye(n, dtype=torch.float64),
                   _where=lambda c, a, b: torch.where(c, torch.as_tensor(a), b),
                   _amax=lambda x: x.abs().max(), eigh=eigh, N=n, eps64=2.0 ** -52,
                   _sign0=sign0 if st.rounding_sign else torch.sign)
        if self.period.get("factored") is True:
            fns.update(factored(self.shapes, self.period.get("rank1_zero", False)))
        if self.period.get("kronecker"):
            fns.update(self._kronecker(st))
        if self.period.get("kfac"):
            fns.update(self._kfac(st))
        if "polar" in self.period or "adjust" in self.period:
            fns.update(self.polar.functions())
        if "eigen" in self.period:
            # the step itself (a spec's `let t` may take the name t)
            every, t = self.period["eigen"].get("every"), self.env.get("step", 1)
            fns.update(self.eigen.functions(every is None or (t - 1) % int(self.h[every]) == 0))
        fns.update(sqrt=scalar(torch.sqrt), sign=scalar(torch.sign), abs=scalar(torch.abs),
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
        if "block" in st.scopes:
            fns["_norm"] = block_norm(self.block_index)
        if "tensor norm" in st.scopes:
            fns["_norm"] = block_norm(self.tensor_index)
        return fns

    @property
    def sampled(self) -> tuple[str, str] | None:
        """(which rows, the scale each row's square carries) where the lines sample rows
        G_r: 'fisher' (per example and drawn label, over sqrt(rows)) or 'gnb' (per draw,
        sqrt(B / samples) times the batch's mean-loss gradient); the caller makes them."""
        kind = self.period.get("sampled")
        return None if kind is None else (kind, self.period.get("row_scale", "1"))

    def step(self, t: int, theta, grad, estimate, rows=None, sampled=None) -> torch.Tensor:
        """``rows``: K-FAC's (a, ds), per layer this batch's input rows (with the 1 for the
        bias) and output gradients; ``sampled``: per tensor, the stack of rows G_r."""
        env = self.env
        if rows is not None:
            env["a"], env["ds"] = rows
        env["_sampled"] = sampled
        if not self.started:
            self.started = True
            zero = torch.zeros_like(theta)
            n = theta.numel()
            for st in self.statements:  # H, the dense structure's curvature: n x n
                env.setdefault(st.target, zero.new_zeros(n, n)
                               if re.fullmatch(r"H(_\w+)?", st.target) else zero)
            if self.period.get("kronecker"):  # L and R: per tensor, its modes' factors
                env["L"], env["R"] = self.kron.zeros(True), self.kron.zeros(False)
            if "eigen" in self.period:  # the eigenbasis's: the modes that keep one
                env.update(self.h)
                env["L"], env["R"] = self.eigen.zeros(True), self.eigen.zeros(False)
            if self.period.get("kfac"):  # A and S: per layer, (in + 1) and out square
                env["A"] = Modes([[zero.new_zeros(n + 1, n + 1)] for _, n in self.layers])
                env["S"] = Modes([[zero.new_zeros(o, o)] for o, _ in self.layers])
            env.setdefault("d", zero)
            if self.period.get("factored") is True:  # R and C: per-row and per-column means
                rows, cols = factored_sizes(self.shapes)
                env["R"], env["C"] = zero.new_zeros(sum(rows)), zero.new_zeros(sum(cols))
            env.update(self.h)
            env.update({f"_hyper_{k}": v for k, v in self.h.items()})
            for name, expr in self.period.get("init", {}).items():
                env[name] = env[name] + _eval(expr, {**env, **self._functions(Statement("", ""))})
            if self.period.get("kfac"):  # the rounding note's condition, as they start
                self.kfac_from_zero = all(not m.any() for name in ("A", "S")
                                          for ms in env[name].mats for m in ms)
            if self.period.get("kronecker"):  # the note's condition, as the lines start
                self.kron.from_zero = all(not m.any() for name in ("L", "R")
                                          for ms in env[name].mats for m in ms)
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
        saved: dict = {}  # a scratch line's names as stored, until a line reads them
        for st in self.statements:
            if (st.refresh or re.search(r"\bE\b", st.expr)) and not refresh:
                continue
            if st.in_basis and t == 1:
                assert self.period["eigen"].get("first"), "the first step's note"
                continue  # no basis yet: d stays 0
            if not all(w(env) for w in st.when):
                continue
            # the expression language's names for the step's values as they stand
            scope = {**env, **self._functions(st), "grad": env["g"], "direction": env["d"]}
            if self.period.get("kfac"):  # K-FAC's normalized line: grad is the gradient
                scope["grad"] = env["_gradient"]
            if st.before_step:
                scope["theta"] = env["param"]
            for name, expr in st.where:
                scope[name] = _eval(expr, scope)
            expr = st.expr
            if st.first is not None and t == 1:
                expr = st.first
            elif st.alternative is not None and _eval(st.alternative[0], scope) == 1:
                expr = st.alternative[1]
            elif st.corrects and self.period.get("uncorrected") == st.corrects[0] \
                    and _eval(st.corrects[0], scope) == 1:
                expr = st.corrects[1]
            try:
                value = _eval(expr, scope)
            except TypeError:  # a let of an optional hyperparameter that is None: unset
                assert any(v is None for v in self.h.values()), expr
                value = None
            if st.negate and env[st.negate]:
                value = -value
            if st.positive is not None:
                value = torch.where(_eval(st.positive, scope) > 0, value, 0.0)
            reads = saved and any(re.search(rf"\b{n}\b", expr) for n in saved)
            if st.scratch:
                saved.update({n: env[n] for n in st.target.split(", ") if n not in saved})
            if "," in st.target:
                env.update(zip(st.target.split(", "), value))
            else:
                env[st.target] = value
            if reads and not st.scratch:  # read where they were meant for: stored ones again
                env.update(saved)
                saved = {}
        return env["theta"]


def assert_same_step(t: int, theta, want, params, lines, rtol: float = 1e-9) -> torch.Tensor:
    """The code's step (``params`` now, from ``theta``) equals explain's ``want`` to
    ``rtol`` of its size; returns the code's parameters, the next step's start (each side
    keeps its own state: a state explain gets wrong shows in a later step)."""
    got = torch.cat([p.detach().reshape(-1) for p in params])
    scale = max(want.abs().max().item(), 1e-300)
    err = (got - theta - want).abs().max().item()
    assert err <= rtol * scale, (
        f"step {t}: the code's step and explain's differ by {err:.3g} "
        f"(the step's size {scale:.3g})\n" + "\n".join(lines))
    return got.clone()


def case(label: str, source: str, hypers: dict, shapes: list[tuple]):
    """One spec beside its lines: (its IR, the compiled optimizer over seeded float64
    parameters of ``shapes``, the parameters, the generator that seeded them (for the
    gradients next), explain's lines, the lines' runner). The runner's hyperparameters
    are the group's as explain's footer reads them: a fallback's value where it is None
    (``shampoo_beta = betas[1]``), machine_eps the parameters' torch.finfo(dtype).eps."""
    import curvc
    from curvc import explain
    from curvc.compiler import _load_cached
    opt_ir = curvc.to_ir(source)
    cls = _load_cached(source, f"<{label}>", "torch")
    gen = torch.Generator().manual_seed(sum(map(ord, label)))
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
              for s in shapes]
    opt = cls(params, **hypers)
    h = dict(opt.param_groups[0])
    h.pop("params")
    for name, (other, index) in cls.FALLBACKS.items():
        if h[name] is None:
            h[name] = h[other] if index is None else h[other][index]
    h = {k: tuple(torch.finfo(torch.float64).eps if x is None else x for x in v)
         if isinstance(v, tuple) else v for k, v in h.items()}
    lines = explain.equations(opt_ir, curvc.to_plan(opt_ir))
    return opt_ir, opt, params, gen, lines, Explained(lines, h, shapes)


def compare_steps(opt, params, gen, lines, run: Explained, steps: int) -> list[float]:
    """``steps`` steps of the code and of the lines on the same random gradients, each
    from the code's parameters (``assert_same_step``); returns each step's difference
    relative to the step's size, and the step's size (a test asserts on both)."""
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    out = []
    for t in range(1, steps + 1):
        grad = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        for p, g in zip(params, torch.split(grad, sizes)):
            p.grad = g.reshape(p.shape).clone()
        opt.step()
        want = run.step(t, theta, grad, None) - theta
        got = assert_same_step(t, theta, want, params, lines)
        scale = want.abs().max().item()
        out.append(((got - theta - want).abs().max().item() / max(scale, 1e-300), scale))
        theta = got
    return out
