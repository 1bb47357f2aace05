"""The AST of a routed spec (``routed NAME``): pipelines and the rules that route
parameters to them. ``curvc.parse`` builds it; ``curvc.routing`` checks it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from curvc.errors import Span, span_field


@dataclass(frozen=True)
class PipelineAST:
    """``pipeline NAME = SPEC(keyword = value, ...)``: ``SPEC`` a spec by name."""

    name: str
    ref: str  # 'muon', 'theory/newton'
    args: tuple  # parse.Arg
    span: Span = span_field()
    name_span: Span = span_field()
    ref_span: Span = span_field()


@dataclass(frozen=True)
class Flag:
    """A boolean hyperparameter of the routed spec, read from the parameter's group."""

    name: str
    span: Span = span_field()


@dataclass(frozen=True)
class Compare:
    """``ndim == 2``, ``shape[0] > 1024``: a property of the parameter against a number."""

    prop: str
    index: int | None
    op: str
    value: int
    span: Span = span_field()
    prop_span: Span = span_field()


@dataclass(frozen=True)
class Not:
    arg: "Rule"
    span: Span = span_field()


@dataclass(frozen=True)
class BoolOp:
    op: str  # 'and' | 'or'
    args: tuple["Rule", ...]
    span: Span = span_field()


Rule = Union[Flag, Compare, Not, BoolOp]


@dataclass(frozen=True)
class RouteAST:
    """``route PIPELINE when RULE``, or ``route PIPELINE otherwise`` (rule None)."""

    pipeline: str
    rule: Rule | None
    span: Span = span_field()
    pipeline_span: Span = span_field()


@dataclass(frozen=True)
class RoutedAST:
    name: str
    params: tuple  # parse.Param
    pipelines: tuple[PipelineAST, ...]
    routes: tuple[RouteAST, ...]
    source: str
    file: str
    name_span: Span = span_field()
