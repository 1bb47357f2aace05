"""Parse a spec's text into an AST that keeps every node's source span.

The grammar (``grammar/curv.lark``) fixes only the shape of a spec; this
module turns Lark's tree into small frozen dataclasses and turns Lark's
exceptions into ``CurvError`` with file, line, column and what was expected.
It decides nothing about meaning: that is ``check``'s job.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Union

import lark
from lark import Lark, Transformer, v_args

from curvc import resources, routing_ast as rast
from curvc.parse_errors import syntax_error
from curvc.errors import CurvError, Span, span_field


# --- AST -------------------------------------------------------------------

@dataclass(frozen=True)
class Number:
    value: float
    text: str
    span: Span = span_field()

    @property
    def literal(self) -> int | float:
        """The value in the kind it was written: ``10`` is an int, ``10.0`` and ``1e1``
        are floats (so a generated signature shows what the spec's author wrote)."""
        if any(c in self.text for c in ".eE") or not self.value.is_integer():
            return self.value
        return int(self.text)


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
class MachineEps:
    """``machine_eps`` as a default: torch.finfo(dtype).eps of the parameter, at step time."""

    span: Span = span_field()


@dataclass(frozen=True)
class TupleLiteral:
    values: tuple[Number | MachineEps, ...]
    span: Span = span_field()


Value = Union[Number, Boolean, Ref]
Literal = Union[Number, Boolean, MachineEps, TupleLiteral, Ref]  # a Ref: a word (``original``)


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
    keyword_span: Span = span_field()  # the keyword alone (the whole argument for a positional one)


@dataclass(frozen=True)
class Modifier:
    """``every k`` (name 'every', value k), a bare word such as ``bias_corrected``, or a
    word with a boolean, ``bias_corrected(use_bias_correction)`` (its value)."""

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


# Expressions (``let``, ``state``, ``update =`` and ``CLAUSE = EXPR``). Leaves are
# ``Number`` and ``Ref`` (a name, optionally indexed); the rest is below.

@dataclass(frozen=True)
class Call:
    """``name(args)``: a function of the expression language, or ``op`` for an operator
    (``+ - * / ^``, ``neg``, and the comparisons ``> < >= <=``)."""

    name: str
    args: tuple["Expr", ...]
    span: Span = span_field()
    name_span: Span = span_field()


Expr = Union[Number, Ref, Call]


@dataclass(frozen=True)
class Definition:
    """``let NAME = EXPR`` (kind 'let'), ``state NAME = EXPR [init EXPR]`` (kind 'state')."""

    kind: str
    name: str
    expr: Expr
    init: Expr | None = None
    span: Span = span_field()
    name_span: Span = span_field()


@dataclass(frozen=True)
class ExprClause:
    """``CLAUSE = EXPR`` (``momentum = ...``, ``curvature = ...``) and ``update = EXPR``."""

    keyword: str
    expr: Expr
    keyword_span: Span = span_field()
    span: Span = span_field()


@dataclass(frozen=True)
class SpecAST:
    name: str
    params: tuple[Param, ...]
    clauses: tuple[Clause | ExprClause, ...]
    source: str
    file: str
    name_span: Span = span_field()
    definitions: tuple[Definition, ...] = ()


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

    def machine_eps(self, children):
        (tok,) = children
        return MachineEps(_span(self.file, tok))

    def ref(self, children):
        (tok,) = children
        return Ref(str(tok), None, _span(self.file, tok))

    @v_args(meta=True)
    def indexed_ref(self, meta, children):
        name, index = children
        digits = index.lstrip("0") or "0"  # int() refuses over 4300 digits, zeros included
        if len(digits) > 9:  # no tuple is that long
            raise CurvError("syntax.index_too_large", _span(self.file, index), text=str(index))
        return Ref(str(name), int(digits), _span(self.file, meta))

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
        span = _span(self.file, meta)
        return Arg(None, children[0], span, span)

    @v_args(meta=True)
    def keyword_arg(self, meta, children):
        name, value = children
        return Arg(str(name), value, _span(self.file, meta), _span(self.file, name))

    @v_args(meta=True)
    def every(self, meta, children):
        return Modifier("every", children[0], _span(self.file, meta))

    def flag(self, children):
        (tok,) = children
        return Modifier(str(tok), None, _span(self.file, tok))

    @v_args(meta=True)
    def flag_arg(self, meta, children):
        tok, value = children
        return Modifier(str(tok), value, _span(self.file, meta))

    def form(self, children):
        name, *args = children
        return (name, tuple(a for a in args if a is not None))

    @v_args(meta=True)
    def clause(self, meta, children):
        keyword, (name, args), *mods = children
        return Clause(str(keyword), str(name), args, tuple(mods),
                      _span(self.file, keyword), _span(self.file, name),
                      _span(self.file, meta))

    # --- expressions ---

    def enumber(self, children):
        (tok,) = children
        return Number(float(tok), str(tok), _span(self.file, tok))

    def evar(self, children):
        (tok,) = children
        return Ref(str(tok), None, _span(self.file, tok))

    eindexed = indexed_ref

    @v_args(meta=True)
    def call(self, meta, children):
        name, *args = children
        return Call(str(name), tuple(a for a in args if a is not None),
                    _span(self.file, meta), _span(self.file, name))

    def _binary(self, meta, children):
        a, tok, b = children
        return Call("op" + str(tok), (a, b), _span(self.file, meta), _span(self.file, tok))

    add = sub = mul = div = pow = compare = v_args(meta=True)(_binary)

    @v_args(meta=True)
    def neg(self, meta, children):
        tok, x = children
        return Call("op-", (x,), _span(self.file, meta), _span(self.file, tok))

    @v_args(meta=True)
    def let(self, meta, children):
        name, expr = children
        return Definition("let", str(name), expr, None, _span(self.file, meta),
                          _span(self.file, name))

    @v_args(meta=True)
    def state(self, meta, children):
        name, expr, init = children
        return Definition("state", str(name), expr, init, _span(self.file, meta),
                          _span(self.file, name))

    @v_args(meta=True)
    def update(self, meta, children):
        (expr,) = children
        span = _span(self.file, meta)
        return ExprClause("update", expr, Span(span.file, span.line, span.column, span.line,
                                               span.column + len("update")), span)

    @v_args(meta=True)
    def expr_clause(self, meta, children):
        keyword, expr = children
        return ExprClause(str(keyword), expr, _span(self.file, keyword), _span(self.file, meta))

    def header(self, children):
        (name,) = children
        return name

    def start(self, children):
        return children

    # --- a routed spec (curvc/routing_ast.py) ---

    routed_header = header

    def routed_start(self, children):
        return ("routed", children)

    def spec_ref(self, children):
        return "".join(str(t) for t in children), children

    @v_args(meta=True)
    def pipeline(self, meta, children):
        name, (ref, toks), *args = children
        first, last = _span(self.file, toks[0]), _span(self.file, toks[-1])
        ref_span = Span(self.file, first.line, first.column, last.end_line, last.end_column)
        return rast.PipelineAST(str(name), ref, tuple(a for a in args if a is not None),
                                _span(self.file, meta), _span(self.file, name), ref_span)

    @v_args(meta=True)
    def route(self, meta, children):
        name, rule = children
        return rast.RouteAST(str(name), rule, _span(self.file, meta), _span(self.file, name))

    @v_args(meta=True)
    def route_otherwise(self, meta, children):
        (name,) = children
        return rast.RouteAST(str(name), None, _span(self.file, meta), _span(self.file, name))

    @v_args(meta=True)
    def rule_or(self, meta, children):
        return rast.BoolOp("or", tuple(children), _span(self.file, meta))

    @v_args(meta=True)
    def rule_and(self, meta, children):
        return rast.BoolOp("and", tuple(children), _span(self.file, meta))

    @v_args(meta=True)
    def rule_not(self, meta, children):
        return rast.Not(children[0], _span(self.file, meta))

    def rule_flag(self, children):
        (tok,) = children
        return rast.Flag(str(tok), _span(self.file, tok))

    def rule_op(self, children):
        return str(children[0])

    def _whole(self, tok) -> int:
        digits = tok.lstrip("0") or "0"
        if len(digits) > 18:  # int() refuses over 4300 digits; no tensor is that long
            raise CurvError("syntax.index_too_large", _span(self.file, tok), text=str(tok))
        return int(digits)

    @v_args(meta=True)
    def rule_compare(self, meta, children):
        name, op, value = children
        return rast.Compare(str(name), None, op, self._whole(value), _span(self.file, meta),
                            _span(self.file, name))

    @v_args(meta=True)
    def rule_compare_indexed(self, meta, children):
        name, index, op, value = children
        span = _span(self.file, meta)
        return rast.Compare(str(name), self._whole(index), op, self._whole(value), span,
                            Span(self.file, span.line, span.column, index.end_line,
                                 index.end_column + 1))


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(resources.grammar_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=True)


def normalize(source: str) -> str:
    """The text the parser reads: no UTF-8 byte order mark, and every line ended by
    "\\n" (\\r\\n from Windows, a lone \\r from old Macs), as Python's universal
    newlines read a file; so line numbers are the ones an editor shows, and columns
    are unchanged."""
    return source.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


_COMMENT = re.compile(r"#[^\n]*")
_CHUNK = 1 << 20


def _spaces(m: re.Match) -> str:
    return " " * (m.end() - m.start())


def _blank_comments(text: str) -> str:
    """``text`` with each comment replaced by as many spaces: every offset, line and
    column stays, and a run of blank and comment lines lexes as one ``_NL`` token.
    (A terminal for "line ends and comments" repeats a group, and Python's re keeps
    backtracking state per repetition: hundreds of bytes per line; and a token per
    comment line costs lark ~20 us.) Done a megabyte of whole lines at a time, as
    re.sub holds every piece of its result until it joins them."""
    if "#" not in text:
        return text
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", min(start + _CHUNK, len(text) - 1))
        end = len(text) if end < 0 else end + 1
        out.append(_COMMENT.sub(_spaces, text[start:end]))
        start = end
    return "".join(out)


def parse(source: str, file: str = "<spec>") -> SpecAST | rast.RoutedAST:
    """Parse spec text; raise ``CurvError`` (never a Lark exception) on bad syntax.
    A ``routed NAME`` spec gives a ``RoutedAST``."""
    source = normalize(source)
    text = source if source.endswith("\n") else source + "\n"
    try:
        tree = _parser().parse(_blank_comments(text))
    except lark.exceptions.UnexpectedInput as e:
        raise syntax_error(e, text, file) from None
    try:
        top = _ToAST(file).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, CurvError):
            raise e.orig_exc.with_source(source) from None
        raise
    if isinstance(top, tuple):  # ("routed", [header, statements...])
        header, *statements = top[1]
        params = tuple(p for st in statements if isinstance(st, tuple) for p in st[1])
        return rast.RoutedAST(
            str(header), params, tuple(s for s in statements if isinstance(s, rast.PipelineAST)),
            tuple(s for s in statements if isinstance(s, rast.RouteAST)), source, file,
            _span(file, header))
    header, *statements = top
    params, clauses, definitions = [], [], []
    for st in statements:
        if isinstance(st, tuple) and st[0] == "hyper":
            params.extend(st[1])
        elif isinstance(st, Definition):
            definitions.append(st)
        else:
            clauses.append(st)
    return SpecAST(str(header), tuple(params), tuple(clauses), source, file,
                   _span(file, header), tuple(definitions))
