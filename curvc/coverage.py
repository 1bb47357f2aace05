"""What the language compiles: its cross product, each spec accepted or refused by a named rule.

Every form of the axes in ``AXES`` (the columns of Table 1, and the clip) is
combined with every other, read from ``curvc.language.FORMS``, so a new form
joins the product by itself. Each spec fills a form's required arguments with
hyperparameters of sensible values (``secant(history = iterate_history)``,
``iterate_history = 5``) and leaves every other clause at its default; where a
form needs a partner to mean anything (``kfac`` needs ``kronecker``) nothing is
added, since the refusal is the point.

Each spec goes through the check stage that ``curvc check`` and ``compile`` run,
and is either accepted (it compiles) or refused by one named rule: a
combination rule (``curvc.rules.COMBINATION_RULES``, ``combo.clash``: the
combination has no meaning) or a code-generation refusal (``rules.REFUSALS``,
``codegen.unsupported``: it means something but is not compiled yet).
``curvc coverage`` prints the counts; ``tests/test_cross_product.py`` trains
every accepted spec.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from curvc import check, compiler, parse, rules
from curvc.errors import CurvError
from curvc.language import FORMS, ArgSpec

AXES = ("curvature", "structure", "iterate", "length", "clip")
LR = 1e-2
NAME = "CrossProduct"

# A sensible value for a required argument, by its constraint (language.ArgSpec).
_VALUES = {"unit": 0.9, "unit_closed": 0.5, "positive": 1.0, "nonneg": 1e-2, "any": 1.0,
           "nonpos": -0.8}
_COUNT = 5  # any count_* constraint: a history of 5 pairs, 5 samples, ...

ACCEPTED = "accepted"
CLASH = "combo.clash"
UNSUPPORTED = "codegen.unsupported"


@dataclass(frozen=True)
class Spec:
    forms: dict  # axis -> form, in AXES order
    source: str
    variants: dict = None  # axis -> (argument, word): a choice of an argument that varies

    @property
    def label(self) -> str:
        v = self.variants or {}
        return "-".join(f + (f"({v[a][0]}={v[a][1]})" if a in v else "")
                        for a, f in self.forms.items())


@dataclass(frozen=True)
class Outcome:
    key: str  # ACCEPTED, CLASH or UNSUPPORTED
    rule: str | None  # the combination rule or refusal that refused it
    message: str  # the error as a user sees it ('' when accepted)


def _value(arg: ArgSpec) -> int | float:
    if arg.constraint.startswith("count_"):
        return _COUNT
    if arg.constraint not in _VALUES:
        raise KeyError(f"no sensible value for a required argument of constraint "
                       f"{arg.constraint!r} ({arg.name}); add one to curvc.coverage._VALUES")
    return _VALUES[arg.constraint]


def spec_source(forms: dict, variants: dict | None = None) -> str:
    """The spec of one point of the product: required arguments are hyperparameters;
    ``variants``: axis -> (argument, word) for an argument that varies."""
    hypers = [f"lr = {LR:g}"]
    lines = []
    for axis, form in forms.items():
        args = [f"{variants[axis][0]} = {variants[axis][1]}"] if axis in (variants or {}) else []
        for arg in FORMS[axis][form].args:
            if arg.required:
                name = f"{axis}_{arg.name}"
                hypers.append(f"{name} = {_value(arg):g}")
                args.append(f"{arg.name} = {name}")
        lines.append(f"{axis:<9} {form}" + (f"({', '.join(args)})" if args else ""))
    return f"optimizer {NAME}\nhyper {', '.join(hypers)}\n" + "\n".join(lines) + "\n"


def points(axis: str) -> list[tuple[str, tuple | None]]:
    """The axis's points of the product: each form, and each other choice of a form's
    argument that varies (``structure kronecker(root = newton_schulz)``)."""
    out = []
    for form, spec in FORMS[axis].items():
        out.append((form, None))
        out += [(form, (a.name, word)) for a in spec.args if a.varies
                for word in a.choices if word != a.default]
    return out


def cross_product() -> list[Spec]:
    """Every combination of the points of AXES, in FORMS order."""
    specs = []
    for combo in itertools.product(*(points(axis) for axis in AXES)):
        forms = {axis: form for axis, (form, _) in zip(AXES, combo)}
        variants = {axis: v for axis, (_, v) in zip(AXES, combo) if v is not None}
        specs.append(Spec(forms, spec_source(forms, variants), variants))
    return specs


def _rule_name(rule) -> str:
    return rule.__name__.removeprefix("_rule_")


def classify(spec: Spec, file: str = "cross_product.curv") -> Outcome:
    """What the check stage (``curvc check``, ``curvc.load``) says of ``spec``, and which
    named rule said it."""
    try:
        compiler.to_ir(spec.source, file)
    except CurvError as e:
        return Outcome(e.key, _which_rule(e, spec.source, file), str(e))
    return Outcome(ACCEPTED, None, "")


def _which_rule(err: CurvError, source: str, file: str) -> str | None:
    if err.key not in (CLASH, UNSUPPORTED):
        return None  # a form's arguments are wrong: a bug here, not a rule
    opt = check.build_ir(parse.parse(source, file))
    if err.key == CLASH:
        for rule in rules.COMBINATION_RULES:  # check runs them in this order
            try:
                rule(opt)
            except CurvError:
                return _rule_name(rule)
        return None
    refusal = rules.first_refusal(opt)
    return refusal.name if refusal is not None else None


def counts(outcomes) -> dict[str, Counter]:
    """{ACCEPTED: Counter({'': n}), CLASH: rule -> n, UNSUPPORTED: refusal -> n}."""
    out = {ACCEPTED: Counter(), CLASH: Counter(), UNSUPPORTED: Counter()}
    for o in outcomes:
        out.setdefault(o.key, Counter())[o.rule or ""] += 1
    return out


def report() -> str:
    """The counts ``curvc coverage`` prints."""
    specs = cross_product()
    by_key = counts(classify(s) for s in specs)
    sizes = " x ".join(f"{len(points(a))} {a}" for a in AXES)
    lines = [f"{len(specs):,} specs: every form of {sizes}",
             f"  {'accepted (compiles)':<50}{sum(by_key[ACCEPTED].values()):>6}"]
    titles = {CLASH: "refused, no meaning (combo.clash)",
              UNSUPPORTED: "refused, not compiled yet (codegen.unsupported)"}
    for key, title in titles.items():
        lines.append(f"  {title:<50}{sum(by_key[key].values()):>6}")
        lines += [f"    {rule:<48}{n:>6}" for rule, n in sorted(by_key[key].items(),
                                                               key=lambda x: (-x[1], x[0]))]
    other = {k: c for k, c in by_key.items() if k not in (ACCEPTED, *titles)}
    lines += [f"  refused by {k}: {sum(c.values())}" for k, c in other.items()]
    return "\n".join(lines)
