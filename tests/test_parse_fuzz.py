"""Property tests of the front end and of the whole pipeline on generated specs.

(a) Whatever text comes in (random characters, token soup, the shipped specs
    mutated character by character or token by token), ``curvc.to_ir`` either
    returns an IR or raises ``CurvError`` whose message renders; never a Lark
    exception, KeyError, TypeError, ... Specs that check are pushed through
    lowering and emission too, which may refuse only with ``CurvError``.
(b) Random valid specs built from ``check.FORMS``: every clause, form,
    argument (literal or hyperparameter reference) and modifier the table
    allows. Check refuses them only by a combination rule; lowering only by
    ``codegen.unsupported``; what lowers emits Python that compiles; and the
    gradient-only ones (constant or empirical_fisher curvature, any structure
    that lowers: scalar, diagonal, kronecker) are imported and stepped 3 times on a tiny
    parameter, which must stay finite (the gradient has no zero entry, so no
    0/0 arises from an undamped g/sqrt(g*g)).

Example counts are modest: the file runs in well under a minute.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import curvc
from curvc import check, compiler
from curvc.errors import CurvError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [p.read_text() for p in sorted((ROOT / "specs").rglob("*.curv"))]
FILE = "fuzz.curv"

FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# Words and punctuation of the language, and some that are near it.
VOCAB = sorted({
    "optimizer", "hyper", "every", "true", "false", *check.FORMS,
    *(f for forms in check.FORMS.values() for f in forms),
    *(a.name for forms in check.FORMS.values() for f in forms.values() for a in f.args),
    *(m for forms in check.FORMS.values() for f in forms.values() for m in f.modifiers),
    "lr", "betas", "eps", "maximize", "params", "lambda", "_x", "structur", "s0", "dict",
    "(", ")", "[", "]", ",", "=", "#", "\n", "\r\n", "\r", "\t", " ", "\x0c", "\u2028",
    "0", "1", "-1", "0.9", "1e-8", "1e999", "-0", ".5", "5.", "1e", "0x10", "99999999999",
    "$", "@", "\"\"\"", "'", "\\", "é", "\x00",
})
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?|\s+|.", re.S)


def assert_only_curv_errors(text: str) -> None:
    """The pipeline on ``text``: CurvError (that renders) or success, nothing else."""
    try:
        opt = curvc.to_ir(text, FILE)
    except CurvError as e:
        rendered = str(e)
        assert rendered.startswith(FILE), rendered
        assert e.key in curvc.errors.MESSAGES
        return
    try:
        plan = curvc.to_plan(opt)
    except CurvError as e:
        assert e.key == "codegen.unsupported", str(e)
        return
    source = compiler.emit_mod.emit(opt, plan, "torch")
    compile(source, "<generated>", "exec")


# --- (a) anything in, CurvError out ----------------------------------------

@FAST
@given(st.text(alphabet=st.sampled_from(sorted(set("".join(VOCAB)) | set("{}:;!?<>*&^%~`|"))),
               max_size=200))
def test_random_characters(text):
    assert_only_curv_errors(text)


@FAST
@given(st.text(max_size=120))
def test_random_unicode(text):
    assert_only_curv_errors(text)


@FAST
@given(st.lists(st.sampled_from(VOCAB), max_size=60))
def test_token_soup(tokens):
    assert_only_curv_errors(" ".join(tokens))


@FAST
@given(st.lists(st.sampled_from(VOCAB), max_size=40))
def test_token_soup_after_a_header(tokens):
    assert_only_curv_errors("optimizer Fuzz\nhyper lr = 1e-3\n" + " ".join(tokens))


def _mutate_chars(data, text: str) -> str:
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["delete", "insert", "replace", "cut"]))
        c = data.draw(st.sampled_from(VOCAB)) if data.draw(st.booleans()) else \
            data.draw(st.characters())
        if op == "delete":
            text = text[:i] + text[i + 1:]
        elif op == "insert":
            text = text[:i] + c + text[i:]
        elif op == "replace":
            text = text[:i] + c + text[i + 1:]
        else:
            text = text[:i]
    return text


def _mutate_tokens(data, text: str) -> str:
    tokens = TOKEN.findall(text)
    for _ in range(data.draw(st.integers(1, 3))):
        if not tokens:
            break
        i = data.draw(st.integers(0, len(tokens) - 1))
        op = data.draw(st.sampled_from(["delete", "duplicate", "replace", "swap", "insert"]))
        if op == "delete":
            del tokens[i]
        elif op == "duplicate":
            tokens.insert(i, tokens[i])
        elif op == "replace":
            tokens[i] = data.draw(st.sampled_from(VOCAB))
        elif op == "insert":
            tokens.insert(i, data.draw(st.sampled_from(VOCAB)))
        else:
            j = data.draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
    return "".join(tokens)


@FAST
@given(st.sampled_from(SHIPPED), st.data())
def test_shipped_specs_with_character_mutations(text, data):
    assert_only_curv_errors(_mutate_chars(data, text))


@FAST
@given(st.sampled_from(SHIPPED), st.data())
def test_shipped_specs_with_token_mutations(text, data):
    assert_only_curv_errors(_mutate_tokens(data, text))


def test_shipped_specs_check():
    for text in SHIPPED:
        curvc.to_ir(text, FILE)


# --- (b) valid specs from the FORMS table ----------------------------------

COMPILED_STRUCTURES = ("scalar", "diagonal")
COMPILED_CURVATURES = ("constant", "empirical_fisher")


def _number(data, constraint: str, kind: str) -> float:
    if kind == "int" or constraint == "positive_int":
        return float(data.draw(st.integers(1, 4)))
    lo, hi = {"any": (-2.0, 2.0), "nonneg": (0.0, 2.0), "positive": (1e-3, 2.0),
              "unit": (0.0, 0.99), "unit_closed": (0.0, 1.0)}[constraint]
    return data.draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(float(v))


class _Spec:
    """Collects hyperparameters while clauses are drawn."""

    def __init__(self, data):
        self.data = data
        self.hypers: list[tuple[str, str]] = [("lr", _fmt(data.draw(st.floats(1e-4, 0.5))))]

    def value(self, arg: check.ArgSpec) -> str:
        d = self.data
        if arg.kind == "enum":
            return d.draw(st.sampled_from(arg.choices))
        if arg.kind == "bool":
            v = d.draw(st.booleans())
        else:
            v = _number(d, arg.constraint, arg.kind)
        how = d.draw(st.sampled_from(["literal", "hyper", "tuple"]))
        if how == "literal" or (how == "tuple" and isinstance(v, bool)):
            return _fmt(v)
        name = f"hp{len(self.hypers)}"
        if how == "hyper":
            self.hypers.append((name, _fmt(v)))
            return name
        other = _number(d, "any", "number")
        i = d.draw(st.integers(0, 1))
        entries = [other, other]
        entries[i] = v
        self.hypers.append((name, f"({_fmt(entries[0])}, {_fmt(entries[1])})"))
        return f"{name}[{i}]"

    def clause(self, keyword: str, form: str) -> str:
        spec = check.FORMS[keyword][form]
        d = self.data
        args = []
        n_pos = d.draw(st.integers(0, len(spec.args)))
        for i, a in enumerate(spec.args):
            if i >= n_pos and not a.required and d.draw(st.booleans()):
                continue  # leave an optional argument at its default
            v = self.value(a)
            args.append(v if i < n_pos else f"{a.name} = {v}")
        text = f"{keyword} {form}"
        if args or d.draw(st.booleans()):  # an empty "()" is allowed too
            text += "(" + ", ".join(args) + ")"
        for m in spec.modifiers:
            if d.draw(st.booleans()):
                text += (f" every {self.value(check.ArgSpec('every', 'int', constraint='positive_int'))}"
                         if m == "every" else f" {m}")
        return text


@st.composite
def valid_specs(draw):
    data = draw(st.data())
    s = _Spec(data)
    if draw(st.integers(0, 3)):  # mostly what the code generator renders
        curvature = draw(st.sampled_from(COMPILED_CURVATURES))
        structure = ("scalar" if curvature == "constant"
                     else draw(st.sampled_from(["diagonal", "diagonal", "kronecker"])))
    else:
        curvature = draw(st.sampled_from(sorted(check.FORMS["curvature"])))
        structure = draw(st.sampled_from(sorted(check.FORMS["structure"])))
    clauses = [s.clause("curvature", curvature), s.clause("structure", structure),
               s.clause("length", draw(st.sampled_from(sorted(check.FORMS["length"]))))]
    for keyword in ("iterate", "clip", "momentum", "decay", "damping", "schedule"):
        if draw(st.booleans()):
            forms = sorted(check.FORMS[keyword])
            if curvature == "constant" and keyword in ("iterate", "damping"):
                forms = [f for f in forms if f in ("instant", "none")] or forms
            clauses.append(s.clause(keyword, draw(st.sampled_from(forms))))
    clauses = draw(st.permutations(clauses))
    sep = draw(st.sampled_from([", ", ",\n      ", " ,  "]))
    hyper = "hyper " + sep.join(f"{n} = {v}" for n, v in s.hypers)
    comment = draw(st.sampled_from(["", "# a generated spec\n", "\n\n"]))
    text = comment + "optimizer Fuzz\n" + hyper + "\n" + "\n".join(clauses) + "\n"
    return text, curvature, structure


def _step_three_times(text: str) -> list[float]:
    cls = compiler._load_cached(text, FILE, "torch")
    assert issubclass(cls, torch.optim.Optimizer)
    p = torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.25]))
    opt = cls([p], fused=False)
    for k in range(3):
        p.grad = torch.tensor([0.5, -1.0, 2.0]) * (k + 1)
        opt.step()
    return p.detach().tolist()


@SLOW
@given(valid_specs())
def test_valid_specs_compile_and_step(spec):
    text, curvature, structure = spec
    try:
        opt = curvc.to_ir(text, FILE)
    except CurvError as e:
        # Arguments and modifiers come from FORMS, so only a combination may be refused.
        assert e.key == "combo.clash", f"{e}\n--- spec:\n{text}"
        return
    elementwise = curvature in COMPILED_CURVATURES and structure in COMPILED_STRUCTURES
    try:
        curvc.to_plan(opt)
    except CurvError as e:
        assert e.key == "codegen.unsupported" and not elementwise, f"{e}\n--- spec:\n{text}"
        return
    source = curvc.to_module_source(text, FILE, "torch")
    compile(source, "<generated>", "exec")
    if curvature in COMPILED_CURVATURES:  # no estimator to feed: step it
        values = _step_three_times(text)
        assert all(math.isfinite(v) for v in values), f"{values}\n--- spec:\n{text}"


def test_the_generator_reaches_the_runtime():
    """Guard against a generator that only ever builds refused specs."""
    reached = []

    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(valid_specs())
    def probe(spec):
        text, curvature, structure = spec
        try:
            curvc.to_plan(curvc.to_ir(text, FILE))
        except CurvError:
            return
        reached.append(text)

    probe()
    assert len(reached) >= 10
