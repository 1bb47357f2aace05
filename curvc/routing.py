"""Routed specs: several pipelines in one optimizer, and the rules that pick one per
parameter (Muon on 2-D hidden weights, AdamW on the rest).

A routed spec (``routed NAME``) declares its own hyperparameters (the constructor's),
``pipeline NAME = SPEC(child = value, ...)`` lines, each a whole single-pipeline spec
(a shipped one, or a ``.curv`` file beside this one) whose hyperparameters are mapped
from this spec's (or fixed), and ``route PIPELINE when RULE`` / ``route PIPELINE
otherwise`` lines. A rule reads the parameter's ``ndim``, ``numel``, ``shape[i]`` and
the boolean hyperparameters of its param group (a flag a user sets per group).

Check builds a ``Routed`` IR: every pipeline's own IR, checked as that spec alone is,
the mapping, and the routes; then it searches shapes built from the rules' numbers
(and flag values) for a parameter two routes both take, or a route no parameter takes.
The generated module holds each pipeline's spec text and builds its class with the
compiler (from the cache) on import; ``curvc.runtime.routed`` routes and steps.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from curvc import ir, parse as ast, routing_ast as rast
from curvc.errors import CurvError, Span, span_field, suggest

PROPERTIES = {"ndim": "the number of dimensions", "numel": "the number of entries",
              "shape": "a dimension's length (shape[i]; false where the tensor has no dim i)"}
_MAX_POINTS = 200_000  # shapes x flag values the overlap search visits at most
_MAX_NDIM = 8  # and dimensions


@dataclass(frozen=True)
class Pipeline:
    name: str
    ref: str  # the spec it is: 'muon', 'theory/newton'
    opt: ir.Optimizer  # that spec's IR, checked on its own
    # (its hyperparameter, from): a HyperRef of this spec's, or a Const fixed here
    mapping: tuple[tuple[str, ir.HyperRef | ir.Const], ...]
    span: Span = span_field()


@dataclass(frozen=True)
class Route:
    pipeline: str
    rule: rast.Rule | None  # None: otherwise
    span: Span = span_field()


@dataclass(frozen=True)
class Routed:
    name: str
    hypers: tuple[ir.Hyper, ...]
    pipelines: tuple[Pipeline, ...]
    routes: tuple[Route, ...]
    source: str = ""
    file: str = "<spec>"
    span: Span = span_field()

    def pipeline(self, name: str) -> Pipeline:
        return next(p for p in self.pipelines if p.name == name)


def is_routed(obj) -> bool:
    return isinstance(obj, (Routed, rast.RoutedAST))


def pipeline_texts(source: str, file: str) -> list[str]:
    """The texts of a routed spec's pipelines (none for any other spec), as they are now."""
    if "routed" not in source:
        return []
    spec = ast.parse(source, file)
    if not isinstance(spec, rast.RoutedAST):
        return []
    return [_resolve(p.ref, file)[0] or "" for p in spec.pipelines]


# --- check ------------------------------------------------------------------------

def check(spec: rast.RoutedAST) -> Routed:
    try:
        return _check(spec)
    except CurvError as e:
        raise e.with_source(spec.source)


def _check(spec: rast.RoutedAST) -> Routed:
    from curvc import check as check_mod
    check_mod._check_optimizer_name(spec.name, spec.name_span)
    hypers = check_mod._check_hypers(spec)
    for h in hypers:
        if isinstance(h.default, str):
            raise CurvError("route.bad_mapping", h.span, why=f"{h.name!r} is a word; a routed "
                            "spec's hyperparameters are numbers, booleans or tuples (write a "
                            "word in the pipeline's mapping)")
    by_name = {h.name: h for h in hypers}
    if not spec.pipelines or not spec.routes:
        raise CurvError("route.incomplete", spec.name_span,
                        missing="a `pipeline NAME = SPEC(...)` line" if not spec.pipelines
                        else "a `route NAME when RULE` line")
    pipelines: dict[str, Pipeline] = {}
    for p in spec.pipelines:
        if p.name in pipelines:
            raise CurvError("route.duplicate_pipeline", p.name_span, name=p.name,
                            hint=f"first defined at line {pipelines[p.name].span.line}")
        pipelines[p.name] = _pipeline(p, spec.file, by_name)
    routes = tuple(_route(r, pipelines, by_name) for r in spec.routes)
    otherwise = [r for r in routes if r.rule is None]
    if len(otherwise) > 1:
        raise CurvError("route.two_otherwise", otherwise[1].span,
                        hint=f"the first is at line {otherwise[0].span.line}")
    for p in pipelines.values():
        if not any(r.pipeline == p.name for r in routes):
            raise CurvError("route.unrouted_pipeline", p.span, name=p.name)
    routed = Routed(spec.name, hypers, tuple(pipelines.values()), routes, spec.source,
                    spec.file, spec.name_span)
    _search(routed)
    return routed


def _resolve(ref: str, file: str) -> tuple[str, str]:
    """(text, file name) of a pipeline's spec: a ``.curv`` beside this spec, else a shipped
    one; shipped specs are named as in a checkout (``specs/muon.curv``)."""
    from curvc import compiler, resources
    if file != "<spec>":
        here = Path(file).parent / f"{ref}.curv"
        if here.is_file():
            return compiler.read(here)[0], str(here)
    found = compiler._shipped_by_name().get(ref)
    if found is None:
        return None, None
    rel = found.relative_to(resources.specs_dir()).as_posix()
    return compiler.read(found)[0], f"specs/{rel}"


def _pipeline(p: rast.PipelineAST, file: str, parent: dict[str, ir.Hyper]) -> Pipeline:
    from curvc import check as check_mod, compiler
    text, child_file = _resolve(p.ref, file)
    if text is None:
        close = suggest(p.ref, compiler.available())
        raise CurvError("route.spec_not_found", p.ref_span, name=p.name, ref=p.ref,
                        hint=f"did you mean {close!r}?" if close else
                        f"shipped specs: {', '.join(compiler.available())}")
    child_ast = ast.parse(text, child_file)
    if isinstance(child_ast, rast.RoutedAST):
        raise CurvError("route.nested", p.ref_span, name=p.name, ref=p.ref)
    opt = check_mod.check(child_ast)
    if opt.structure.kind in ("dense", "low_rank") or opt.curvature.kind == "kfac":
        # these read the whole model (its layers, one vector of all parameters)
        raise CurvError("route.whole_model", p.ref_span, name=p.name, ref=p.ref)
    child = {h.name: h for h in opt.hypers}
    mapping: dict[str, ir.HyperRef | ir.Const] = {}
    for arg in p.args:
        if arg.keyword is None:
            raise CurvError("route.bad_mapping", arg.span, why="name the pipeline's "
                            "hyperparameter each value is for (`lr = adamw_lr`)")
        if arg.keyword not in child:
            close = suggest(arg.keyword, child)
            raise CurvError("route.unknown_hyper", arg.keyword_span, ref=p.ref, name=arg.keyword,
                            allowed=", ".join(child),
                            hint=f"did you mean {close!r}?" if close else None)
        if arg.keyword in mapping:
            raise CurvError("route.bad_mapping", arg.keyword_span,
                            why=f"{arg.keyword!r} of pipeline {p.name!r} is mapped twice")
        mapping[arg.keyword] = _mapped(arg, child[arg.keyword], p, parent)
    return Pipeline(p.name, p.ref, opt, tuple(mapping.items()), p.span)


def _kind(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, tuple):
        return f"a tuple of {len(v)}"
    if isinstance(v, str):
        return "a word"
    return "a number"


def _mapped(arg, target: ir.Hyper, p: rast.PipelineAST, parent: dict[str, ir.Hyper]):
    v = arg.value
    want = _kind(target.default)
    if isinstance(v, ast.Ref) and v.name in parent:
        h = parent[v.name]
        value = h.default
        if v.index is not None:
            if not isinstance(value, tuple) or v.index >= len(value):
                raise CurvError("route.bad_mapping", v.span, why=f"{v.name!r} has no entry "
                                f"{v.index} ({_kind(value)})")
            value = value[v.index]
        if _kind(value) != want:
            raise CurvError("route.bad_mapping", v.span, why=f"{p.ref}'s {target.name!r} is "
                            f"{want}; {arg.value.name if v.index is None else v} is "
                            f"{_kind(value)}")
        return ir.HyperRef(v.name, v.index, v.span)
    if isinstance(v, ast.Ref):
        if target.choices and v.index is None and v.name in target.choices:
            return ir.Const(v.name, v.span)  # a word of the pipeline's, fixed here
        close = suggest(v.name, parent)
        raise CurvError("name.unknown_hyper", v.span, name=v.name,
                        hint=f"did you mean {close!r}?" if close else None)
    value = v.value if isinstance(v, ast.Boolean) else v.literal
    if _kind(value) != want:
        raise CurvError("route.bad_mapping", v.span, why=f"{p.ref}'s {target.name!r} is "
                        f"{want}, not {_kind(value)}")
    return ir.Const(value, v.span)


def _route(r: rast.RouteAST, pipelines: dict, parent: dict[str, ir.Hyper]) -> Route:
    if r.pipeline not in pipelines:
        close = suggest(r.pipeline, pipelines)
        raise CurvError("route.unknown_pipeline", r.pipeline_span, name=r.pipeline,
                        allowed=", ".join(pipelines),
                        hint=f"did you mean {close!r}?" if close else None)
    if r.rule is not None:
        _check_rule(r.rule, parent)
    return Route(r.pipeline, r.rule, r.span)


def _check_rule(rule: rast.Rule, parent: dict[str, ir.Hyper]) -> None:
    flags = [h.name for h in parent.values() if isinstance(h.default, bool)]
    if isinstance(rule, (rast.Not, rast.BoolOp)):
        for sub in (rule.arg,) if isinstance(rule, rast.Not) else rule.args:
            _check_rule(sub, parent)
    elif isinstance(rule, rast.Flag):
        if rule.name in PROPERTIES:
            raise CurvError("route.bad_property", rule.span, name=rule.name,
                            why=f"{rule.name} is a number: compare it (`{rule.name} == 2`)")
        if rule.name not in parent or rule.name not in flags:
            close = suggest(rule.name, [*PROPERTIES, *flags])
            what = "is not a boolean hyperparameter" if rule.name in parent else "is unknown"
            raise CurvError("route.bad_property", rule.span, name=rule.name,
                            why=f"it {what}; a rule reads ndim, numel, shape[i] or a boolean "
                            "hyperparameter (a param group's flag)" +
                            (f": {', '.join(flags)}" if flags else ""),
                            hint=f"did you mean {close!r}?" if close else None)
    else:
        if rule.prop not in PROPERTIES:
            close = suggest(rule.prop, PROPERTIES)
            raise CurvError("route.bad_property", rule.prop_span, name=rule.prop,
                            why="a rule compares ndim, numel or shape[i] with a number",
                            hint=f"did you mean {close!r}?" if close else None)
        if (rule.prop == "shape") != (rule.index is not None):
            raise CurvError("route.bad_property", rule.prop_span, name=rule.prop,
                            why="shape takes an index (shape[0])" if rule.prop == "shape"
                            else f"{rule.prop} is one number and takes no index")


# --- the rules as Python, and the search for overlaps --------------------------------

def render(rule: rast.Rule) -> str:
    """A rule as a Python expression of ``ndim``, ``numel``, ``shape`` and ``group`` (the
    param group): what the generated class tests, and what the search below evaluates."""
    if isinstance(rule, rast.BoolOp):
        return "(" + f" {rule.op} ".join(render(a) for a in rule.args) + ")"
    if isinstance(rule, rast.Not):
        return f"(not {render(rule.arg)})"
    if isinstance(rule, rast.Flag):
        return f"bool(group[{rule.name!r}])"
    if rule.prop == "shape":
        return f"(ndim > {rule.index} and shape[{rule.index}] {rule.op} {rule.value})"
    return f"({rule.prop} {rule.op} {rule.value})"


def show(rule: rast.Rule | None, top: bool = True) -> str:
    """A rule as the spec writes it."""
    if rule is None:
        return "otherwise"
    if isinstance(rule, rast.BoolOp):
        text = f" {rule.op} ".join(show(a, False) for a in rule.args)
        return text if top else f"({text})"
    if isinstance(rule, rast.Not):
        return f"not {show(rule.arg, False)}"
    if isinstance(rule, rast.Flag):
        return rule.name
    prop = rule.prop if rule.index is None else f"{rule.prop}[{rule.index}]"
    return f"{prop} {rule.op} {rule.value}"


def _walk(rule):
    yield rule
    for sub in (rule.arg,) if isinstance(rule, rast.Not) else \
            rule.args if isinstance(rule, rast.BoolOp) else ():
        yield from _walk(sub)


def _divisors(n: int) -> set[int]:
    if n > 10 ** 6:  # a large numel: its own value (as one dim) is what the search tries
        return {1, n}
    return {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}


def _points(routed: Routed):
    """(points, whether they are all there is to try): shapes and flag values that tell the rules apart: every dim length near a number a
    rule names (and the divisors of a numel it names), up to one dim more than any rule
    reads; and every combination of the flags the rules read."""
    nodes = [n for r in routed.routes if r.rule is not None for n in _walk(r.rule)]
    flags = sorted({n.name for n in nodes if isinstance(n, rast.Flag)})
    lengths, ndims = {1, 2}, {0, 1, 2, 3}
    for n in nodes:
        if isinstance(n, rast.Compare):
            if n.prop == "ndim":
                ndims |= {max(0, n.value - 1), n.value, n.value + 1}
            else:
                near = {n.value - 1, n.value, n.value + 1}
                lengths |= near | (_divisors(n.value) if n.prop == "numel" and n.value > 0
                                   else set())
                if n.prop == "shape":
                    ndims |= {n.index, n.index + 1, n.index + 2}
    lengths = sorted(x for x in lengths if x >= 1)
    complete = max(ndims) <= _MAX_NDIM  # beyond it a rule is checked at run time only
    ndims = sorted(n for n in ndims if n <= _MAX_NDIM)

    def points():
        for values in itertools.product((False, True), repeat=len(flags)):
            group = dict(zip(flags, values))
            for ndim in ndims:
                for shape in itertools.product(lengths, repeat=ndim):
                    yield shape, group
    return points(), complete


def _search(routed: Routed) -> None:
    tests = [(r, eval(f"lambda ndim, numel, shape, group: {render(r.rule)}", {}))  # noqa: S307
             for r in routed.routes if r.rule is not None]  # our own rendering of checked names
    matched = {id(r): False for r, _ in tests}
    points, complete = _points(routed)
    for count, (shape, group) in enumerate(points):
        if count > _MAX_POINTS:
            return  # too many to visit: the runtime still refuses a parameter two routes take
        hits = [r for r, test in tests
                if test(len(shape), math.prod(shape), shape, group)]
        for r in hits:
            matched[id(r)] = True
        if len(hits) > 1:
            a, b = hits[0], hits[1]
            raise CurvError("route.overlap", b.span, first=a.pipeline, line=a.span.line,
                            second=b.pipeline, example=_example(shape, group),
                            hint="make the rules exclusive, or make one of them `otherwise`")
    for r, _ in tests:
        if complete and not matched[id(r)]:
            raise CurvError("route.never_matches", r.span, pipeline=r.pipeline,
                            rule=show(r.rule))


def _example(shape: tuple, group: dict) -> str:
    dims = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
    text = f"shape {dims} (ndim {len(shape)}, numel {math.prod(shape)})"
    if group:
        text += " in a group with " + ", ".join(f"{k} = {str(v).lower()}"
                                                for k, v in group.items())
    return text
