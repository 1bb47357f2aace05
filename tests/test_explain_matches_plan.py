"""`curvc explain` (and every generated module's header) prints the numbers of the code.

For every shipped spec (hybrids and theory rows included) and for power, damping and
refresh variants, the exponents, the place of eps and the bias-correction counts
explain prints are compared with the lowered plan. The plan is read here on its own
terms (its KroneckerStage arguments, the pow/sqrt it applies to tensors, its
DenseStage fields, its host scalars), never through explain's helpers; explain's text
is parsed with regular expressions.
"""
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import curvc
from curvc import explain, resources, routing
from curvc.plan import Const, FactoredStage, Load, Op, PolarStage, Precondition, Scalar, walk
from curvc.plan_eigen import EigenbasisStage

SHIPPED = resources.shipped_specs()


def _variant(name: str, old: str, new: str) -> tuple[str, str]:
    text = SHIPPED[name].read_text()
    assert old in text, (name, old)
    return f"{name}: {new}", text.replace(old, new)


VARIANTS = dict(
    # a routed spec's pipelines are shipped specs (muon_adamw: muon and adamw), here already
    [(name, SHIPPED[name].read_text()) for name in SHIPPED
     if not routing.is_routed(curvc.to_ir(SHIPPED[name].read_text()))]
    + [_variant(name, "length    gradient_norm", f"length    gradient_norm(power = {p})")
       for name in ("shampoo", "adam", "gn_normalized_ngd") for p in ("0.5", "1", "2", "3")]
    + [_variant("shampoo", "length    gradient_norm",
                f"length    gradient_norm(power = 3)\ndamping   {d}(1e-3)") for d in ("inside", "add")]
    + [_variant("adam", "damping   add(eps)", f"damping   {d}(eps)") for d in ("inside", "floor")]
    + [_variant("gn_normalized_ngd", "length    gradient_norm",
                f"length    gradient_norm(power = 3)\ndamping   {d}(1e-3)") for d in ("inside", "add")]
    + [_variant("adam", "keep_max = amsgrad) bias_corrected",
                "keep_max = amsgrad) bias_corrected every 3")]
    + [_variant("kfac", "length    none", f"length    {ln}")
       for ln in ("gradient_norm(power = 0.5)", "gradient_norm", "gradient_norm(power = 3)",
                  "eigen_sign", "normalized")]
    + [_variant("kfac", "length    none\ndamping   inside(damping)", f"length    {ln}\n{d}")
       for ln in ("none", "gradient_norm(power = 3)", "eigen_sign")
       for d in ("damping   add(damping)", "")]
    + [_variant("adafactor", "length    gradient_norm", f"length    gradient_norm(power = {p})")
       for p in ("1", "3")]
    + [_variant("adafactor", "damping   floor(eps[0])", f"damping   {d}(eps[0])")
       for d in ("inside", "add")]
    + [_variant("muon", "c = ns_coefficients[2], eps = eps)",
                "c = 2, eps = 1e-3, precision = float64)")]
    + [_variant("kfac", "ema(stat_decay) every stat_every", it)
       for it in ("ema(stat_decay) bias_corrected every stat_every", "sum(init = 2)", "instant")]
    + [_variant("ekfac_like", "length    none\ndamping   inside(damping)", f"{ln}\n{d}")
       for ln in ("length    none", "length    gradient_norm(power = 3)", "length    eigen_sign")
       for d in ("damping   add(damping)", "damping   floor(damping)", "")]
)


def _compile(text):
    opt = curvc.to_ir(text)
    return opt, curvc.to_plan(opt)


# --- reading the plan ------------------------------------------------------------

def _hyper_values(plan) -> dict:
    out = {"step": 7.0}  # any step: only used to evaluate host expressions
    for h in plan.hypers:
        if isinstance(h.default, tuple):
            # machine_eps (None) as float64's, what the runtime takes for float64 parameters
            out.update({f"{h.name}_{i}": 2.0 ** -52 if v is None else float(v)
                        for i, v in enumerate(h.default)})
        elif h.choices:  # a word reaches the host as its index
            out[h.name] = float(h.choices.index(h.default))
        else:
            out[h.name] = 2.0 ** -52 if h.default is None else float(h.default)
    return out


def _evaluate(plan, e) -> float:
    """A host expression's value, with the hyperparameters at their defaults."""
    host, values = dict(plan.host), _hyper_values(plan)
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Scalar):
        return _evaluate(plan, host[e.name]) if e.name in host else values[e.name]
    a, b = (_evaluate(plan, x) for x in e.args)
    ops = {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
           "div": lambda: a / b, "pow": lambda: a ** b, "mod": lambda: math.fmod(a, b),
           "ne": lambda: float(a != b), "eq": lambda: float(a == b), "gt": lambda: float(a > b)}
    return ops[e.op]()  # only the node's own operation: a zero elsewhere is no division


def _param_nodes(plan):
    return list(walk(next(st.value for st in plan.stores if st.target == "param")))


def _reads_tensor(e) -> bool:
    return any(isinstance(n, Load) for n in walk(e))


def _tensor_roots(plan) -> list[tuple[float, bool]]:
    """(exponent, eps inside) of each sqrt/pow the step applies to a tensor."""
    out = []
    for n in _param_nodes(plan):
        if isinstance(n, Op) and n.op in ("sqrt", "pow") and _reads_tensor(n.args[0]):
            x = n.args[0]
            inside = isinstance(x, Op) and x.op == "add" and not _reads_tensor(x.args[1])
            out.append((0.5 if n.op == "sqrt" else _evaluate(plan, n.args[1]), inside))
    return out


def _kronecker_args(plan) -> dict:
    node = next(n for n in _param_nodes(plan) if isinstance(n, Precondition))
    stage = plan.stage(node.stage)
    assert stage.per_mode  # each of a matrix's 2 factors takes the product's root / 2
    return {k: _evaluate(plan, v) for k, v in zip(stage.params, node.args[2:])}


def _check_eigenbasis_lines(plan, lines):
    """The D' line divides by the stage's P of V: its root, eps inside or after, floor."""
    node = next(n for n in _param_nodes(plan) if isinstance(n, Precondition))
    stage = plan.stage(node.stage)
    args = {k: _evaluate(plan, v) for k, v in zip(stage.params, node.args[2:])}
    d = _line(lines, "D'    = ")
    what, p = re.fullmatch(r"D'    = (\S+) / \((.*?)\)(   \(0 where that is 0\))?", d).group(1, 2)
    assert (what == "sign(M')") == (stage.length == "eigen_sign"), d
    if args["floor"]:
        p = re.fullmatch(rf"max\((.*), \S+\)", p).group(1)
    if args["eps_after"]:
        p = re.fullmatch(r"(.*) \+ \S+", p).group(1)
    e = args["exponent"]
    # a bias-corrected V is read as V_hat (V itself stays as the next step averages it)
    v = "V" if args["bias_correction"] in (1, 1.0) else "V_hat"
    inner = rf"{v} \+ \S+" if args["eps_inside"] else v
    want = {0.5: rf"sqrt\({inner}\)", 1.0: inner}.get(
        e, (rf"\({inner}\)" if args["eps_inside"] else inner) + r"\^\((\S+)\)")
    m = re.fullmatch(want, p)
    assert m, (want, p)
    if e not in (0.5, 1.0):
        assert Fraction(m.group(1)) == Fraction(e).limit_denominator(64), d
    assert ("qr(L Q)" in " ".join(lines)) == (stage.method == "power_qr")


def _check_polar_lines(plan, opt, lines):
    """The Newton-Schulz iteration's numbers: explain names the hyperparameters (or
    prints the numbers) the plan's stage reads, and its precision."""
    node = next(n for n in _param_nodes(plan) if isinstance(n, Precondition))
    stage = plan.stage(node.stage)
    args = dict(zip(stage.params, node.args[2:]))
    text = {k: _evaluate(plan, v) for k, v in args.items()}
    values = _hyper_values(plan)
    start, step = [ln for ln in lines if ln.startswith("X     = ")]
    m = re.fullmatch(r"X     = (\S+) X \+ \((\S+) A \+ (\S+) A A\) X,  A = X X\^T   \((\S+) "
                     r"times\)", step)
    assert m, step
    printed = [float(eval(g.replace("[", "_").replace("]", ""), {"__builtins__": {}}, values))
               for g in m.groups()]
    assert printed == [text["a"], text["b"], text["c"], text["steps"]]
    eps = re.search(r"max\(\|\|\S+\|\|_F, (\S+)\)", start).group(1)
    assert float(eval(eps, {"__builtins__": {}}, values)) == text["eps"]
    assert f"by Newton-Schulz in {stage.precision}" in " ".join(lines)


# --- reading explain ---------------------------------------------------------------

def _line(lines, start):
    return next(line for line in lines if line.startswith(start))


def _number(text: str, plan) -> float:
    """An exponent as explain prints it: '1/4', '3/2' or 'hessian_power/2'."""
    return float(eval(text, {"__builtins__": {}}, _hyper_values(plan)))  # noqa: S307 - our text


@pytest.mark.parametrize("name", VARIANTS)
def test_explain_prints_the_exponents_of_the_plan(name):
    opt, plan = _compile(VARIANTS[name])
    lines = explain.equations(opt, plan)
    assert lines == explain.equations(opt)  # lowering it again changes nothing
    header = curvc.to_module_source(VARIANTS[name]).split('"""')[1]
    words = " ".join(header.split())  # the header wraps long lines at 100 columns
    for line in lines:  # the module header prints the same
        assert " ".join(line.replace("\\", "/").split()) in words, line
    if plan.matrix and isinstance(plan.matrix[0], EigenbasisStage):
        _check_eigenbasis_lines(plan, lines)
    elif plan.matrix and isinstance(plan.matrix[0], FactoredStage):
        _check_factored_lines(plan, lines)
    elif plan.matrix and isinstance(plan.matrix[0], PolarStage):
        _check_polar_lines(plan, opt, lines)
    elif plan.matrix:
        args = _kronecker_args(plan)
        d = _line(lines, "d     = ")
        for factor in ("L", "R"):  # (F + inside I)^-x, or ((F + inside I)^x + after I)^-1
            m = re.search(rf"{factor}( \+ (\S+) I\))?\^(-?)(\S+?)( \+ (\S+) I\)\^-1)?(?: |$)",
                          d)
            assert m, (factor, d)
            assert Fraction(m.group(4)) == Fraction(args["exponent"] / 2).limit_denominator(64)
            assert (m.group(2) is not None) == (args["eps_inside"] != 0), d
            assert (m.group(6) is not None) == (args["eps_after"] != 0), d
            assert (m.group(3) == "-") == (args["eps_after"] == 0), d  # inverted once
    elif plan.dense is not None:
        st = plan.dense
        # curvc.runtime.dense: w^(power/2) for gradient_norm, sqrt for eigen_sign, w otherwise
        expected = {"gradient_norm": _evaluate(plan, st.power) / 2,
                    "eigen_sign": 0.5}.get(st.length, 1.0)
        d = _line(lines, "d     = ")
        after = re.search(r"\(H(\^(\S+))? \+ \S+ I\)\^-1 ", d)
        if _evaluate(plan, st.eps_after):
            assert after, d
            assert Fraction(after.group(2) or "1") == Fraction(expected).limit_denominator(64)
        else:
            m = re.search(r"(H|\(H \+ \S+ I\))\^-(\S+) ", d)
            assert m, d
            assert Fraction(m.group(2)) == Fraction(expected).limit_denominator(64)
            assert (m.group(1) != "H") == (_evaluate(plan, st.eps_inside) != 0), d
    elif plan.estimator is not None and plan.estimator.kind == "kfac":
        _check_kfac_lines(plan, lines)
    elif plan.secant is None and opt.curvature.kind == "constant" and opt.update is not None:
        # the spec's own arithmetic (RAdam's sqrt(exp_avg_sq) in `update =`), printed as written
        assert not [line for line in lines if line.startswith("P     = ")]
        assert f"({opt.update})" in lines[-1]
    elif plan.secant is None:
        roots = _tensor_roots(plan)
        p = [line for line in lines if line.startswith("P     = ")]
        if not p:
            assert not roots
            return
        p = p[0][len("P     = "):]
        m = re.search(r"sqrt\((.*?)\)|\^\((.*?)\)", p)
        if not roots:
            assert m is None, p
            return
        ((exponent, inside),) = set(roots)
        assert m, p
        shown = 0.5 if m.group(1) is not None else _number(m.group(2), plan)
        assert shown == pytest.approx(exponent), p
        base = m.group(1) if m.group(1) is not None else p[:m.start()]  # what the root is of
        assert (" + " in base) == inside, p


def _check_factored_lines(plan, lines):
    """curvc.runtime.matrix.factored takes f(V) = 1 / max((V + eps_inside)^e + eps_after,
    floor) of the factored diagonal V, elementwise."""
    node = next(n for n in _param_nodes(plan) if isinstance(n, Precondition))
    args = {k: _evaluate(plan, v) for k, v in zip(plan.stage(node.stage).params, node.args[2:])}
    p = _line(lines, "P     = ")[len("P     = "):]
    e = args["exponent"]
    if e == 0.5:
        assert "sqrt(V" in p, p
    elif e == 1.0:
        assert "sqrt" not in p and "^" not in p, p
    else:
        m = re.search(r"\^\((.*?)\)", p)
        assert m and _number(m.group(1), plan) == pytest.approx(e), p
    assert ("V + " in p) == (args["eps_inside"] != 0), p
    assert p.startswith("max(") == (args["floor"] != 0), p
    assert bool(re.search(r"\) \+ |V \+ \S+$|\^\S+\) \+ ", p)) == (args["eps_after"] != 0) or \
        args["eps_inside"] != 0, p


def _check_kfac_lines(plan, lines):
    """curvc.runtime.kfac takes f(F) = ((F + damping I)^exponent + damping_after I)^-1 of
    each factor (of its eigenvalues, for sign); normalized reduces grad * natural_gradient."""
    args = dict(plan.estimator.args)
    e = Fraction(_evaluate(plan, args["exponent"])).limit_denominator(64)
    inside, after = (_evaluate(plan, args[k]) != 0 for k in ("damping", "damping_after"))
    if args["sign"]:
        x, y, g = "s_i", "a_j", "sign"
        line = _line(lines, "g     = Q_S [")
        pattern = (rf"1/\({x}\^(\S+) \+ \S+\) 1/\({y}\^(\S+) \+ \S+\) {g}" if after else
                   rf"\({x} \+ \S+\)\^-(\S+) \({y} \+ \S+\)\^-(\S+) {g}" if inside else
                   rf"{x}\^-(\S+) {y}\^-(\S+) {g}")
    else:
        line = next(ln for ln in lines if "[grad W, grad b]" in ln)
        g = r"\[grad W, grad b\]"
        pattern = (rf"\(S\^?(\S*) \+ \S+ I\)\^-1 {g} \(A\^?(\S*) \+ \S+ I\)\^-1" if after else
                   rf"\(S \+ \S+ I\)\^-(\S+) {g} \(A \+ \S+ I\)\^-(\S+)" if inside else
                   rf"S\^-(\S+) {g} A\^-(\S+)")
    m = re.search(pattern, line)
    assert m, (pattern, line)
    assert Fraction(m.group(1) or "1") == Fraction(m.group(2) or "1") == e, line
    reads = [{n.name for n in walk(r.value) if isinstance(n, Load)}
             for r in plan.reductions]
    normalized = {"grad", "natural_gradient"} in reads
    assert normalized == any(ln.startswith("g     = g / sqrt(sum(grad * g))") for ln in lines)
    shown = [ln for ln in lines if re.match(r"[AS]     = [AS] / \(1 - \S+\^n\)$", ln)]
    assert len(shown) == (2 if args["bias_corrected"] else 0), lines


@pytest.mark.parametrize("name", [n for n in VARIANTS if "bias_corrected" in VARIANTS[n]])
def test_explain_prints_what_each_bias_correction_counts(name):
    opt, plan = _compile(VARIANTS[name])
    lines = explain.equations(opt, plan)
    host = dict(plan.host)
    eigen = any(isinstance(st, EigenbasisStage) for st in plan.matrix)  # V, in the basis
    for buffer, var in (("curvature", "V" if eigen else "C"), ("momentum", "m")):
        corrections = [e for n, e in host.items() if n.startswith(f"{buffer}_bias_correction")]
        # the Kronecker factors' correction is printed for both factors, L and R
        # an elementwise state's correction is what the step reads, X_hat (X stays as kept)
        shown = [line for line in lines if line.startswith(f"{var}     = {var} / (1 - ")
                 or re.match(rf"{var}_hat = (\(.*\)|\S+) / \(1 - ", line)
                 or var == "C" and line.startswith("L, R  = L / (1 - ")]
        assert len(shown) == len(corrections), (buffer, lines)
        for e, line in zip(corrections, shown):
            power = e.args[1]  # 1 - beta^count
            # iterate ema_or_sum: beta^count (beta != 1); bias_corrected(flag): (flag != 0)
            while power.op == "mul":
                power = power.args[0]
            count = power.args[1]
            by_step = count == Scalar("step")
            assert ("^t)" in line.split("   (")[0]) == by_step, line


def test_shampoo_with_power_2_is_documented_with_the_exponent_it_runs():
    """The defect: `gradient_norm(power = 2)` ran exponent 1 and was shown as L^-1/4."""
    name = "shampoo: length    gradient_norm(power = 2)"
    opt, plan = _compile(VARIANTS[name])
    assert _kronecker_args(plan)["exponent"] == 1.0
    assert "d     = L^-1/2 b R^-1/2" in "\n".join(explain.equations(opt, plan))
    assert explain.table_row(opt, plan)["Structure Approximation"] == "L^-1/2 g R^-1/2"


def test_a_spec_curvc_does_not_compile_is_explained_from_its_ir_and_says_so():
    path = Path(__file__).parent / "errors" / "codegen_kfac_max_dim.curv"
    out = explain.explain(curvc.to_ir(path.read_text(), str(path), compilable=False))
    assert "not compiled (structure kronecker(max_dim) with curvature kfac" in out


def _inverse_root(m, x):
    w, q = torch.linalg.eigh(m)
    return q @ torch.diag(w ** -x) @ q.T


@pytest.mark.parametrize("power", ["0.5", "1", "2", "3"])
def test_the_shampoo_exponent_explain_prints_is_the_one_the_step_takes(tmp_path, power):
    """One step on a 3x2 matrix, against d = L^-x G R^-x with x parsed from explain."""
    name = f"shampoo: length    gradient_norm(power = {power})"
    opt_ir, plan = _compile(VARIANTS[name])
    d = _line(explain.equations(opt_ir, plan), "d     = ")
    x = float(Fraction(re.search(r"L\^-(\S+) ", d).group(1)))
    spec = tmp_path / f"shampoo_{power.replace('.', '_')}.curv"
    spec.write_text(VARIANTS[name])
    Shampoo = curvc.load(spec, backend="torch")
    torch.manual_seed(0)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2, dtype=torch.float64)
    w0 = w.detach().clone()
    opt = Shampoo([w], lr=0.1, matrix_eps=1e-2)
    w.grad = g.clone()
    opt.step()
    left = 1e-2 * torch.eye(3, dtype=torch.float64) + g @ g.T  # L_0 = matrix_eps I
    right = 1e-2 * torch.eye(2, dtype=torch.float64) + g.T @ g
    expected = w0 - 0.1 * _inverse_root(left, x) @ g @ _inverse_root(right, x)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-9, atol=1e-12)
