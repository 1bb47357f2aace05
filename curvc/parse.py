"""Parse a spec's text into an AST that keeps every node's source span.

The grammar (``grammar/curv.lark``) fixes only the shape of a spec; this
module turns Lark's tree into small frozen dataclasses and turns Lark's
exceptions into ``CurvError`` with file, line, column and what was expected.
It decides nothing about meaning: that is ``check``'s job.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Union

import lark
from lark import Lark, Token, Transformer, v_args

from curvc import resources
from curvc.errors import CurvError, Span, span_field


# --- AST -------------------------------------------------------------------

@dataclass(frozen=True)
class Number:
    value: float
    text: str
    span: Span = span_field()


@dataclass(frozen=True)
class Boolean:
    value: bool
    span: Span = span_field()


@dataclass(frozen=True)
class Ref:
    """A name used as a value: a hyperparameter, or an enum word like ``rademacher``."""

    name: str
    index: int | None = None
    span: Span = span_field()


@dataclass(frozen=True)
class TupleLiteral:
    values: tuple[Number, ...]
    span: Span = span_field()


Value = Union[Number, Boolean, Ref]
Literal = Union[Number, Boolean, TupleLiteral]


@dataclass(frozen=True)
class Param:
    name: str
    default: Literal
    span: Span = span_field()


@dataclass(frozen=True)
class Arg:
    keyword: str | None
    value: Value
    span: Span = span_field()


@dataclass(frozen=True)
class Modifier:
    """``every k`` (name 'every', value k) or a bare word such as ``bias_corrected``."""

    name: str
    value: Value | None = None
    span: Span = span_field()


@dataclass(frozen=True)
class Clause:
    keyword: str
    form: str
    args: tuple[Arg, ...]
    modifiers: tuple[Modifier, ...]
    keyword_span: Span = span_field()
    form_span: Span = span_field()
    span: Span = span_field()


@dataclass(frozen=True)
class SpecAST:
    name: str
    params: tuple[Param, ...]
    clauses: tuple[Clause, ...]
    source: str
    file: str
    name_span: Span = span_field()


# --- Lark tree -> AST ------------------------------------------------------

def _span(file: str, meta_or_token) -> Span:
    m = meta_or_token
    if getattr(m, "empty", False):
        return Span(file)
    return Span(file, m.line, m.column, m.end_line, m.end_column)


class _ToAST(Transformer):
    """Builds AST nodes; never validates (the check pass does)."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def number(self, children):
        (tok,) = children
        return Number(float(tok), str(tok), _span(self.file, tok))

    def boolean(self, children):
        (tok,) = children
        return Boolean(tok == "true", _span(self.file, tok))

    def ref(self, children):
        (tok,) = children
        return Ref(str(tok), None, _span(self.file, tok))

    @v_args(meta=True)
    def indexed_ref(self, meta, children):
        name, index = children
        return Ref(str(name), int(index), _span(self.file, meta))

    @v_args(meta=True)
    def tuple_literal(self, meta, children):
        return TupleLiteral(tuple(children), _span(self.file, meta))

    @v_args(meta=True)
    def param(self, meta, children):
        name, default = children
        return Param(str(name), default, _span(self.file, name))

    def hyper(self, children):
        return ("hyper", tuple(children))

    @v_args(meta=True)
    def positional_arg(self, meta, children):
        return Arg(None, children[0], _span(self.file, meta))

    @v_args(meta=True)
    def keyword_arg(self, meta, children):
        name, value = children
        return Arg(str(name), value, _span(self.file, meta))

    @v_args(meta=True)
    def every(self, meta, children):
        return Modifier("every", children[0], _span(self.file, meta))

    def flag(self, children):
        (tok,) = children
        return Modifier(str(tok), None, _span(self.file, tok))

    def form(self, children):
        name, *args = children
        return (name, tuple(a for a in args if a is not None))

    @v_args(meta=True)
    def clause(self, meta, children):
        keyword, (name, args), *mods = children
        return Clause(str(keyword), str(name), args, tuple(mods),
                      _span(self.file, keyword), _span(self.file, name),
                      _span(self.file, meta))

    def header(self, children):
        (name,) = children
        return name

    def start(self, children):
        return children


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(resources.grammar_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=True)


# Human names for the grammar's terminals, for "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "SIGNED_NUMBER": "a number", "INT": "an integer index",
    "CLAUSE": "a clause (curvature, structure, iterate, length, clip, momentum, decay, damping, schedule)",
    "HYPER": "'hyper'", "OPTIMIZER": "'optimizer'", "EVERY": "'every'",
    "TRUE": "true", "FALSE": "false", "_NL": "a new line",
    "LPAR": "'('", "RPAR": "')'", "COMMA": "','", "EQUAL": "'='",
    "LSQB": "'['", "RSQB": "']'", "$END": "the end of the spec",
}


def _describe_expected(expected) -> str:
    names = sorted({_TERMINAL_NAMES.get(t, repr(t).lower()) for t in expected})
    if not names:
        return "something else"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "the end of the spec"
    if tok.type == "_NL":
        return "the end of the line"
    return f"{str(tok)!r}"


def parse(source: str, file: str = "<spec>") -> SpecAST:
    """Parse spec text; raise ``CurvError`` (never a Lark exception) on bad syntax."""
    try:
        tree = _parser().parse(source if source.endswith("\n") else source + "\n")
    except lark.exceptions.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            lines = source.splitlines() or [""]
            span = Span(file, len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
            raise CurvError("syntax.unexpected_eof", span, source,
                            expected=_describe_expected(e.expected)) from None
        span = Span(file, tok.line, tok.column, tok.end_line or tok.line,
                    tok.end_column or tok.column + 1)
        raise CurvError("syntax.unexpected_token", span, source, found=_describe_token(tok),
                        expected=_describe_expected(e.expected)) from None
    except lark.exceptions.UnexpectedCharacters as e:
        span = Span(file, e.line, e.column, e.line, e.column + 1)
        raise CurvError("syntax.unexpected_char", span, source, found=e.char,
                        expected=_describe_expected(e.allowed or ())) from None
    except lark.exceptions.UnexpectedEOF as e:
        raise CurvError("syntax.unexpected_eof", Span(file), source,
                        expected=_describe_expected(e.expected)) from None
    header, *statements = _ToAST(file).transform(tree)
    params, clauses = [], []
    for st in statements:
        if isinstance(st, tuple) and st[0] == "hyper":
            params.extend(st[1])
        else:
            clauses.append(st)
    return SpecAST(str(header), tuple(params), tuple(clauses), source, file,
                   _span(file, header))
