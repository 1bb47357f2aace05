"""One error type for every mistake in a spec, and one registry of messages.

Every user-facing message lives in ``MESSAGES`` (mypy's message_registry
idea): tests and docs refer to the key, and the wording is fixed in one
place. A ``CurvError`` knows where it happened and renders like a compiler::

    specs/bad.curv:4:11: error: unknown structure 'diagnal'
        structure diagnal
                  ^^^^^^^
    did you mean 'diagonal'?
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A region of a spec's source; 1-based line and column, end exclusive."""

    file: str = "<spec>"
    line: int = 0
    column: int = 0
    end_line: int = 0
    end_column: int = 0


def span_field():
    """A dataclass field for spans: kept on the node, ignored by ==/hash."""
    return field(default=Span(), compare=False, repr=False)


MESSAGES: dict[str, str] = {
    # syntax
    "syntax.unexpected_token": "unexpected {found}; expected {expected}",
    "syntax.unexpected_char": "unexpected character {found!r}; expected {expected}",
    "syntax.unexpected_eof": "the spec ends too early; expected {expected}",
    # names and values
    "name.unknown_form": "unknown {clause} {name!r}",
    "name.unknown_hyper": "unknown hyperparameter {name!r}",
    "name.unknown_argument": "{clause} {form} takes no argument {name!r}; it takes {allowed}",
    "name.unknown_modifier": "unknown modifier {name!r} for {clause} {form}; allowed: {allowed}",
    "name.duplicate_clause": "{clause} is given twice",
    "name.duplicate_hyper": "hyperparameter {name!r} is defined twice",
    "name.duplicate_argument": "argument {name!r} is given twice",
    "name.reserved_hyper": "{name!r} is reserved: every compiled optimizer takes it as a keyword argument",
    "value.too_many_arguments": "{clause} {form} takes at most {count} positional argument(s)",
    "value.missing_argument": "{clause} {form} needs the argument {name!r}",
    "value.wrong_kind": "{what} must be {expected}, not {found}",
    "value.bad_index": "{name!r} is not a tuple, so it cannot be indexed",
    "value.index_out_of_range": "{name}[{index}] is out of range: {name!r} has {size} entries",
    "value.out_of_range": "{what} must be {expected}, got {value}",
    "value.bool_expected": "{what} must be true or false",
    # combinations of axes
    "combo.missing_clause": "a spec needs a {clause} clause ({why})",
    "combo.clash": "{a} clashes with {b}: {why}",
    # code generation
    "codegen.unsupported": "code generation for {what} is not available yet ({why}); "
    "`curvc explain` shows its update rule",
    "codegen.unknown_backend": "unknown backend {name!r}; choose one of {allowed}",
    # loading
    "load.not_found": "no spec named {name!r}; shipped specs: {allowed}",
}


def suggest(name: str, candidates) -> str | None:
    """The closest candidate, for a "did you mean" hint."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


class CurvError(Exception):
    """A mistake in a spec (or in how it is used), with its place in the source."""

    def __init__(self, key: str, span: Span | None = None, source: str | None = None,
                 hint: str | None = None, **fields):
        self.key = key
        self.span = span
        self.source = source
        self.hint = hint
        self.fields = fields
        self.message = MESSAGES[key].format(**fields)
        super().__init__(self.render())

    def with_source(self, source: str) -> "CurvError":
        """The same error, able to quote the line it points at."""
        if self.source is None:
            self.source = source
            self.args = (self.render(),)
        return self

    def render(self) -> str:
        span = self.span
        if span is None or span.line == 0:
            text = f"error: {self.message}"
        else:
            text = f"{span.file}:{span.line}:{span.column}: error: {self.message}"
            lines = (self.source or "").splitlines()
            if 0 < span.line <= len(lines):
                line = lines[span.line - 1]
                width = 1
                if span.end_line == span.line and span.end_column > span.column:
                    width = span.end_column - span.column
                text += f"\n    {line}\n    {' ' * (span.column - 1)}{'^' * width}"
        if self.hint:
            text += f"\n{self.hint}"
        return text

    def __str__(self) -> str:
        return self.render()
