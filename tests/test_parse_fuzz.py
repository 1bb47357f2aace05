"""Property tests of the front end and of the whole pipeline on generated specs.

(a) Whatever text comes in (random characters, token soup, the shipped specs
    mutated character by character or token by token), ``curvc.to_ir`` either
    returns an IR or raises ``CurvError`` whose message renders; never a Lark
    exception, KeyError, TypeError, ... Specs that check are pushed through
    lowering and emission too, which may refuse only with ``CurvError``.
(b) Random valid specs built from ``language.FORMS``: every clause, form,
    argument (literal or hyperparameter reference) and modifier the table
    allows. Check refuses them only by a combination rule; lowering only by
    ``codegen.unsupported``; what lowers emits Python that compiles; and the
    gradient-only ones (constant or empirical_fisher curvature, any structure
    that lowers: scalar, diagonal, kronecker) are imported and stepped 3 times on a tiny
    parameter, which must stay finite (the gradient has no zero entry, so no
    0/0 arises from an undamped g/sqrt(g*g)).
(c) Large and odd inputs: long literals and lines, indices and numbers of
    thousands of digits, a byte order mark, \\n, \\r\\n and \\r line ends mixed,
    long runs of blank and comment lines. The result is the spec's IR or a
    ``CurvError`` whose message stays short (~200 characters of a line quoted)
    with its caret under the faulty character; blank runs, line ends and a BOM
    never change a spec's meaning.

Example counts are modest: the file runs in well under a minute.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import curvc
from curvc import compiler, language, routing
from curvc.errors import CurvError

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module", autouse=True)
def _generated_modules_out_of_sight():
    """Hypothesis seeds its generators with constants it parses out of every local module
    in sys.modules. Late in the suite those include thousands of generated optimizer
    modules (cache.run_source registers each): parsing them took a minute, and the
    examples drawn depended on which tests ran before. They are set aside while this
    file runs, and put back."""
    hidden = {k: m for k, m in sys.modules.items() if k.startswith("curvc_generated.")}
    for k in hidden:
        del sys.modules[k]
    yield
    for k, m in hidden.items():
        sys.modules.setdefault(k, m)


SHIPPED = [p.read_text() for p in sorted((ROOT / "specs").rglob("*.curv"))]
FILE = "fuzz.curv"

FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# Words and punctuation of the language, and some that are near it.
VOCAB = sorted({
    "optimizer", "hyper", "every", "true", "false", *language.FORMS,
    *(f for forms in language.FORMS.values() for f in forms),
    *(a.name for forms in language.FORMS.values() for f in forms.values() for a in f.args),
    *(m for forms in language.FORMS.values() for f in forms.values() for m in f.modifiers),
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
    if routing.is_routed(opt):  # a plan per pipeline: the whole module, as compile makes it
        compile(compiler.to_module_source(text, FILE, "torch"), "<generated>", "exec")
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


# --- (c) large and odd inputs --------------------------------------------------

MAX_MESSAGE = 5000  # characters in a rendered error, whatever the input's size
MAX_QUOTED = 4 + 200 + 2 * 3  # indent, ~200 characters of the line, '...' on each side
LOCATED = re.compile(rf"{re.escape(FILE)}:(\d+):(\d+): error: ")
LINE_ENDS = ["\n", "\r\n", "\r"]
BLANK_LINES = ["\n", "   \n", "\t\n", "# a comment\n", "#\n", "  # indented ( comment\n"]
INDEXED = [t for t in SHIPPED if re.search(r"\w\[[01]\]", t)]
NUMBERED = [t for t in SHIPPED if re.search(r"= [0-9.e-]+", t)]


def _editor_lines(text: str) -> list[str]:
    """The lines an editor shows: a BOM is no character, \r\n, \r and \n end a line."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def assert_bounded(text: str):
    """The IR of ``text``, or None after a CurvError of bounded size that quotes
    the faulty line with the caret under the faulty character."""
    try:
        return curvc.to_ir(text, FILE)
    except CurvError as e:
        err = e
    rendered = str(err)
    assert err.key in curvc.errors.MESSAGES
    assert len(rendered) <= MAX_MESSAGE, (err.key, len(rendered))
    lines = rendered.split("\n")
    located = LOCATED.match(lines[0])
    assert located or lines[0].startswith(f"{FILE}: error: "), lines[0][:300]
    if located:
        quoted, caret_line = lines[1], lines[2]
        assert quoted.startswith("    ") and set(caret_line.strip()) == {"^"}, rendered[:600]
        assert len(quoted) <= MAX_QUOTED and len(caret_line) <= MAX_QUOTED, err.key
        line, column = int(located[1]), int(located[2])
        source_line = _editor_lines(text)[line - 1]
        caret = caret_line.index("^")
        if column <= len(source_line) and caret < len(quoted):
            assert quoted[caret] in (source_line[column - 1], "?"), (err.key, line, column)
    return None


def _same_meaning(a, b) -> bool:
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")


def _with_line_ends(data, text: str) -> str:
    """``text`` with each line end drawn from \n, \r\n and \r (one style or mixed)."""
    style = data.draw(st.sampled_from(["lf", "crlf", "cr", "mixed"]))
    if style != "mixed":
        return text.replace("\n", {"lf": "\n", "crlf": "\r\n", "cr": "\r"}[style])
    lines = text.split("\n")
    ends = [data.draw(st.sampled_from(LINE_ENDS)) for _ in lines[:-1]]
    return "".join(line + end for line, end in zip(lines, ends)) + lines[-1]


@st.composite
def blank_runs(draw, text: str):
    """``text`` with runs of blank, white-space and comment lines at line boundaries."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(lines) - 1))
        run = draw(st.sampled_from(BLANK_LINES)) * draw(st.integers(1, 50_000))
        lines[at] = run + lines[at] if at == 0 else lines[at] + "\n" + run.rstrip("\n")
    return "\n".join(lines)


@SLOW
@given(st.sampled_from(SHIPPED), st.data())
def test_blank_runs_line_ends_and_a_bom_keep_the_meaning(text, data):
    changed = _with_line_ends(data, data.draw(blank_runs(text)))
    if data.draw(st.booleans()):
        changed = "\ufeff" + changed
    opt = assert_bounded(changed)
    assert opt is not None, changed[:300]
    assert _same_meaning(opt, curvc.to_ir(text, FILE))


LONG_CHARS = ["x", "1", "0", "9", ".", "e", "_", "#", " ", "\t", "$", "\u00e9", "(", ",", "[", "\x0c"]


@SLOW
@given(st.sampled_from(SHIPPED), st.sampled_from(LONG_CHARS), st.integers(100, 200_000),
       st.data())
def test_long_literals_and_lines_give_short_errors(text, char, count, data):
    at = data.draw(st.integers(0, len(text)))
    changed = text[:at] + char * count + text[at:]
    if data.draw(st.booleans()):
        changed = _with_line_ends(data, changed)
    assert_bounded(changed)


@SLOW
@given(st.sampled_from(INDEXED), st.integers(0, 10_000),
       st.sampled_from(["0", "1", "2", "9", "12345678901", "9" * 5000]), st.data())
def test_indices_of_thousands_of_digits(text, zeros, digits, data):
    matches = list(re.finditer(r"(\w)\[([01])\]", text))
    m = data.draw(st.sampled_from(matches))
    changed = text[:m.start(2)] + "0" * zeros + digits + text[m.end(2):]
    opt = assert_bounded(changed)
    if digits in ("0", "1"):  # leading zeros change nothing
        same = text[:m.start(2)] + digits + text[m.end(2):]
        assert opt is not None and _same_meaning(opt, curvc.to_ir(same, FILE))


HUGE_NUMBERS = [
    lambda n: "9" * n,                    # overflows to infinity past ~309 digits
    lambda n: "0." + "0" * n + "1",       # underflows to 0 past ~324 zeros
    lambda n: "1e-" + "9" * min(n, 400),  # underflows
    lambda n: "1e" + "9" * min(n, 400),   # overflows
    lambda n: "1" + "0" * n + "e-" + str(n),  # exactly 1
    lambda n: "0" * n + ".5",             # exactly 0.5
    lambda n: "0" * n + "e-99999",        # exactly 0, written as 0
]


@SLOW
@given(st.sampled_from(NUMBERED), st.sampled_from(range(len(HUGE_NUMBERS))),
       st.integers(1, 100_000), st.data())
def test_numbers_of_thousands_of_digits(text, form, n, data):
    matches = list(re.finditer(r"(?<== )[0-9.e-]+", text))
    m = data.draw(st.sampled_from(matches))
    assert_bounded(text[:m.start()] + HUGE_NUMBERS[form](n) + text[m.end():])


def test_the_generators_reach_success_and_refusal():
    """Guard against generators whose inputs are all refused (or all accepted)."""
    outcomes = []

    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(NUMBERED), st.sampled_from(range(len(HUGE_NUMBERS))),
           st.integers(1, 2000), st.data())
    def probe(text, form, n, data):
        m = data.draw(st.sampled_from(list(re.finditer(r"(?<== )[0-9.e-]+", text))))
        outcomes.append(assert_bounded(text[:m.start()] + HUGE_NUMBERS[form](n) + text[m.end():])
                        is not None)

    probe()
    assert any(outcomes) and not all(outcomes)


# --- (b) valid specs from the FORMS table ----------------------------------

COMPILED_STRUCTURES = ("scalar", "diagonal")
COMPILED_CURVATURES = ("constant", "empirical_fisher")


def _number(data, constraint: str, kind: str) -> float:
    if kind == "int" or constraint == "positive_int":
        return float(data.draw(st.integers(1, 4)))
    lo, hi = {"any": (-2.0, 2.0), "nonneg": (0.0, 2.0), "positive": (1e-3, 2.0),
              "unit": (0.0, 0.99), "unit_closed": (0.0, 1.0), "nonpos": (-2.0, 0.0)}[constraint]
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

    def value(self, arg: language.ArgSpec) -> str:
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
        spec = language.FORMS[keyword][form]
        # a vector-valued argument (`of = NAME`) needs a let or state; the expression
        # language has its own tests (tests/test_expressions.py)
        spec = language.FormSpec(tuple(a for a in spec.args if a.kind != "expr"),
                                 spec.modifiers)
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
                text += (f" every {self.value(language.ArgSpec('every', 'int', constraint='positive_int'))}"
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
        curvature = draw(st.sampled_from(sorted(language.FORMS["curvature"])))
        structure = draw(st.sampled_from(sorted(language.FORMS["structure"])))
    clauses = [s.clause("curvature", curvature), s.clause("structure", structure),
               s.clause("length", draw(st.sampled_from(sorted(language.FORMS["length"]))))]
    for keyword in ("iterate", "clip", "momentum", "decay", "damping", "schedule"):
        if draw(st.booleans()):
            forms = sorted(language.FORMS[keyword])
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
    try:  # compilable=False: the code-generation refusals are asked below, of to_plan
        opt = curvc.to_ir(text, FILE, compilable=False)
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

    @settings(max_examples=80, deadline=None, derandomize=True,
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
