"""No clause is silently dropped: every clause, argument and modifier a spec
writes either changes the generated plan or is refused.

Specs are built from ``curvc.language.FORMS``: every form of every clause, with
its required arguments, each optional argument written at its default and at
another value (a hyperparameter for a boolean), and each set of its
modifiers. The sweep starts from every curvature x structure x iterate x
length x clip (the other clauses at their defaults; clip-free ones also
with a few settings of momentum, decay, damping and schedule, which meet
the structure, iterate and length where the root and damping are placed) and, for each
start, changes one clause at a time to each of its variants (the clauses
after the paper's five only in starts without a clip: a clip acts on the
finished step). Among the
variants that compile, two that mean different things must lower to
different plans (``curvc.to_plan``); the few pairs that are the same
mathematics are listed in ``same_meaning`` with the reason.

Plans are compared without ``hypers`` and ``validators``: every spec here
declares the same hyperparameters, and validators are constructor checks
of the arguments, not the step.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import defaultdict

import pytest

import curvc
from curvc import check, language, parse
from curvc.errors import CurvError

AXES = language.CLAUSES
MAIN = AXES[:5]

# A boolean hyperparameter, so a boolean argument can be a runtime flag.
HYPERS = "hyper lr = 0.1, hbool = true"
# A required argument's value in the starting variant, and its other value.
REQUIRED = {"unit": ("0.9", "0.6"), "unit_closed": ("0.3", "0.6"), "positive": ("1.5", "0.25"),
            "nonneg": ("0.1", "0.2"), "positive_int": ("3", "5"), "any": ("1.5", "0.25"),
            "count_history": ("3", "5"), "nonpos": ("-0.8", "-0.5")}


def _show(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _other(arg: language.ArgSpec) -> str:
    """A value of an optional argument other than its default, within its constraint."""
    d = arg.default
    if arg.kind == "bool":
        return _show(not d)
    if arg.kind == "enum":
        return next(c for c in arg.choices if c != d)
    if arg.kind == "int":
        return _show(d + 2)
    return _show(d * 0.5 if d > 0 else 0.1)


@dataclasses.dataclass(frozen=True)
class Variant:
    axis: str
    text: str  # the clause after its keyword: FORM(ARGS) MODIFIERS
    form: str
    args: tuple  # (name, value text), explicit defaults left out: what the variant means
    modifiers: tuple


def variants(axis: str, form: str) -> list[Variant]:
    spec = language.FORMS[axis][form]
    required = {a.name: REQUIRED[a.constraint][0] for a in spec.args if a.required}

    def make(args: dict, mods=(), defaults=()) -> Variant:
        shown = ", ".join(f"{k} = {v}" for k, v in args.items())
        text = form + (f"({shown})" if shown else "") + "".join(f" {m}" for m in mods)
        meaning = tuple(sorted((k, v) for k, v in args.items() if k not in defaults))
        return Variant(axis, text, form, meaning, tuple(mods))

    out = []
    for r in range(len(spec.modifiers) + 1):
        for mods in itertools.combinations(spec.modifiers, r):
            out.append(make(required, ["every 2" if m == "every" else m for m in mods]))
    for a in spec.args:
        if a.kind == "expr":  # names a let or state: tests/test_expressions.py covers `of`
            continue
        if a.required:
            out.append(make({**required, a.name: REQUIRED[a.constraint][1]}))
            continue
        out.append(make({**required, a.name: _show(a.default)}, defaults=(a.name,)))
        out.append(make({**required, a.name: _other(a)}))
        if a.kind == "bool":  # a hyperparameter makes it a runtime flag
            out.append(make({**required, a.name: "hbool"}))
    return out


VARIANTS = {ax: [v for form in language.FORMS[ax] for v in variants(ax, form)] for ax in AXES}
START = {ax: variants(ax, form)[0] for ax, form in language.DEFAULT_FORMS.items()}
# Settings of the clauses the paper sets aside, for starts without a clip.
PROFILES = (
    {"momentum": "heavy_ball(beta = 0.9)", "decay": "l2(rate = 0.1)",
     "damping": "inside(eps = 0.1)", "schedule": "inverse_time(rate = 0.1)"},
    {"momentum": "ema(beta = 0.9) bias_corrected", "decay": "decoupled(rate = 0.1)",
     "damping": "add(eps = 0.1)"},
    {"momentum": "ema(beta = 0.9)", "damping": "floor(eps = 0.1)"},
)


def _variant(axis: str, text: str) -> Variant:
    return next(v for v in VARIANTS[axis] if v.text == text)


# --- compiling, cached: a clause is parsed once, a spec lowered once ----------------

_HEADER = f"optimizer X\n{HYPERS}\n"


@functools.lru_cache(maxsize=None)
def _header() -> parse.SpecAST:
    return parse.parse(_HEADER)


@functools.lru_cache(maxsize=None)
def _clause(axis: str, text: str) -> parse.Clause:
    return parse.parse(f"{_HEADER}{axis} {text}\n").clauses[0]


def spec_text(spec: dict) -> str:
    return _HEADER + "".join(f"{ax} {spec[ax].text}\n" for ax in AXES)


_PLANS: dict = {}


def plan_of(spec: dict):
    """The spec's plan (without hypers and validators), or None if it is refused."""
    key = tuple(spec[ax].text for ax in AXES)
    if key not in _PLANS:
        # The same AST curvc.to_ir(spec_text(spec)) builds, from clauses parsed once.
        ast = dataclasses.replace(_header(),
                                  clauses=tuple(_clause(ax, spec[ax].text) for ax in AXES),
                                  source=spec_text(spec))
        try:
            plan = curvc.to_plan(check.check(ast))
            _PLANS[key] = dataclasses.replace(plan, hypers=(), validators=())
        except CurvError:
            _PLANS[key] = None
    return _PLANS[key]


def test_the_cached_ast_is_the_parsed_one():
    spec = {**START, "curvature": _variant("curvature", "hutchinson squared every 2"),
            "structure": _variant("structure", "diagonal"),
            "iterate": _variant("iterate", "ema(beta = 0.9) bias_corrected"),
            "length": _variant("length", "gradient_norm(power = 0.5)")}
    text = spec_text(spec)
    assert plan_of(spec) == dataclasses.replace(curvc.to_plan(curvc.to_ir(text)), hypers=(),
                                                validators=())


# --- what counts as the same mathematics -----------------------------------------

def same_meaning(a: Variant, b: Variant, spec: dict) -> str | None:
    """Why variants a and b of one clause are the same step in the context ``spec``, or None."""
    if (a.form, a.args, a.modifiers) == (b.form, b.args, b.modifiers):
        return "an optional argument written at its default value"
    pair = {a.form, b.form}
    if a.axis == "decay" and pair == {"l2", "decoupled"}:
        l2, dec = (a, b) if a.form == "l2" else (b, a)
        if dict(l2.args).get("decoupled") == "true" and \
                dict(l2.args).get("rate") == dict(dec.args).get("rate") and \
                dict(l2.args).get("fixed") == dict(dec.args).get("fixed"):
            return "`l2(rate, decoupled = true)` is defined as `decoupled(rate)`"
    if a.axis == "damping" and pair == {"add", "inside"} and a.args == b.args \
            and spec["structure"].form in ("scalar", "diagonal") \
            and spec["length"].form in ("none", "normalized"):
        return "no root is taken, so eps added before or after it gives the same P = C + eps"
    if a.axis == "clip" and a.form == b.form == "elementwise" and \
            {k: v for k, v in a.args if k != "on"} == {k: v for k, v in b.args if k != "on"} \
            and spec["curvature"].form == "constant" \
            and spec["length"].form in ("none", "gradient_norm") \
            and spec["momentum"].form == spec["decay"].form == "none":
        return ("with no curvature, momentum or decay between them the step d is the "
                "gradient g: clamping g (on = gradient) is clamping d")
    if a.axis == "length" and pair <= {"none", "gradient_norm"} \
            and spec["curvature"].form == "constant":
        return ("with H' = L I, H'^-power/2 is a constant folded into lr: the paper's "
                "gradient-norm counterpart of gradient descent is gradient descent")
    return None


# --- the sweep -----------------------------------------------------------------

def starts():
    for forms in itertools.product(*(language.FORMS[ax] for ax in MAIN)):
        spec = {**START, **{ax: variants(ax, f)[0] for ax, f in zip(MAIN, forms)}}
        if forms[-1] != "none":  # a clip acts on the finished step: vary only the paper's axes
            if plan_of(spec) is not None:
                yield spec, MAIN
            continue
        if plan_of(spec) is not None:
            yield spec, AXES
        for profile in PROFILES:
            varied = {**spec, **{ax: _variant(ax, t) for ax, t in profile.items()}}
            if plan_of(varied) is not None:
                yield varied, ("structure", "iterate", "length")


def problems(structure: str) -> list[str]:
    out, seen = [], set()
    for spec, axes in starts():
        if spec["structure"].form != structure:
            continue
        for axis in axes:
            context = tuple((ax, spec[ax].text) for ax in AXES if ax != axis)
            if (axis, context) in seen:
                continue
            seen.add((axis, context))
            compiled = [(v, plan_of({**spec, axis: v})) for v in VARIANTS[axis]]
            compiled = [(v, p) for v, p in compiled if p is not None]
            for (a, pa), (b, pb) in itertools.combinations(compiled, 2):
                why = same_meaning(a, b, spec)
                where = " | ".join(f"{ax} {t}" for ax, t in context)
                if pa == pb and why is None:
                    out.append(f"{axis} {a.text!r} and {axis} {b.text!r} lower to the same "
                               f"plan, with {where}")
                elif pa != pb and why is not None:
                    out.append(f"{axis} {a.text!r} and {axis} {b.text!r} differ although "
                               f"{why}, with {where}")
    return out


@pytest.mark.parametrize("structure", list(language.FORMS["structure"]))
def test_every_clause_changes_the_plan_or_is_refused(structure):
    found = problems(structure)
    assert not found, f"{len(found)} dropped clauses, e.g.:\n" + "\n".join(found[:20])


def test_the_sweep_compiles_every_structure_and_most_forms():
    """The sweep is not vacuous: every form of every clause compiles in some start."""
    compiled = defaultdict(set)
    for spec, _ in starts():
        for ax in AXES:
            compiled[ax].add(spec[ax].form)
    for ax in MAIN:
        assert compiled[ax] == set(language.FORMS[ax]), ax
