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
    "syntax.unexpected_char": "unexpected character {found}; expected {expected}",
    "syntax.unexpected_eof": "the spec ends too early; expected {expected}",
    "syntax.empty": "the spec is empty; it must begin with `optimizer NAME`",
    "syntax.missing_header": "a spec must begin with `optimizer NAME`, not {found}",
    "syntax.unknown_clause": "unknown clause {found}; a line starts with 'hyper' or a clause "
    "({clauses})",
    "syntax.index_too_large": "the index {text} is far too large",
    # names and values
    "name.unknown_form": "unknown {clause} {name!r}",
    "name.unknown_hyper": "unknown hyperparameter {name!r}",
    "name.unknown_argument": "{clause} {form} has no argument {name!r}; its arguments: {allowed}",
    "name.no_arguments": "{clause} {form} takes no arguments",
    "name.unknown_modifier": "unknown modifier {name!r} for {clause} {form}; {allowed}",
    "name.misplaced_modifier": "{clause} {form} takes no modifier {name!r}; "
    "{name!r} applies only to {owners}",
    "name.duplicate_clause": "the {clause} clause is given twice",
    "name.duplicate_hyper": "hyperparameter {name!r} is defined twice",
    "name.duplicate_modifier": "the modifier {name!r} is given twice",
    "name.modifier_takes_no_value": "the modifier {name!r} takes no value",
    "name.duplicate_argument": "the argument {name!r} of {clause} {form} is given twice",
    "name.reserved_hyper": "{name!r} cannot name a hyperparameter: {why}",
    "name.reserved_optimizer": "{name!r} cannot name an optimizer: {why}",
    "name.tuple_entry_clash": "hyperparameter {name!r} clashes with {tuple}[{index}]: "
    "the compiled optimizer passes the entries of the tuple {tuple!r} as {entries}",
    "value.too_many_arguments": "{clause} {form} takes at most {count} positional "
    "argument{s} ({names})",
    "value.missing_argument": "{clause} {form} needs the argument {name!r}",
    "value.wrong_kind": "{what} must be {expected}, not {found}",
    "value.not_finite": "the number {text} is too large: it overflows to infinity",
    "value.bad_index": "{name!r} is not a tuple, so it cannot be indexed",
    "value.index_out_of_range": "{name}[{index}] is out of range: {name!r} has {size} entries",
    "value.out_of_range": "{what} must be {expected}, got {value}",
    "name.unread_word_hyper": "the hyperparameter {name!r} is the word {word!r}, and no "
                              "argument that takes words reads it",
    "value.bool_expected": "{what} must be true or false, not {found}",
    "value.underflow": "the number {text} is too small: it underflows to 0",
    # expressions
    "expr.not_expression_clause": "the {clause} clause takes a form, not an expression; "
    "expressions give {allowed}",
    "expr.unknown_name": "unknown name {name!r} in an expression",
    "expr.unknown_function": "unknown function {name!r}",
    "expr.arity": "{name}() takes {count} argument{s}, not {given}",
    "expr.duplicate_definition": "{name!r} is defined twice",
    "expr.name_taken": "{name!r} cannot name a {kind}: {why}",
    "expr.not_a_state": "old() reads a state's stored value; {name!r} is not a state",
    "expr.tensor_condition": "the condition of if() is decided once per step on the host, so "
    "it may read hyperparameters, step and ndim, not {name!r}",
    "expr.boolean_operand": "the boolean {name!r} can only be the condition of if()",
    "expr.host_init": "a state starts from a number or a hyperparameter expression, not {name!r}",
    "expr.per_tensor_init": "a state starts from one value per param group, so its init "
    "cannot read {name!r}, which differs per tensor",
    "expr.cycle": "{path}: each needs the other's value of this step",
    "expr.unused": "{kind} {name!r} is defined but never read",
    "expr.expected_name": "{what} must name a vector (grad, a let or a state), not {found}",
    "expr.unguarded_none": "{name!r} has no value unless one is given (`hyper {name} = none`), "
    "so it is read only inside the A of if(given({name}), A, B)",
    "expr.given_not_optional": "given() asks whether an optional hyperparameter (`hyper NAME = "
    "none`) was given; {found} is not one",
    "expr.given_outside_if": "given() is only the whole condition of an if(): "
    "if(given(NAME), A, B)",
    # combinations of axes
    "combo.missing_clause": "a spec needs a {clause} clause ({why})",
    "combo.missing_lr": "a spec needs the hyperparameter 'lr' (every step is "
    "theta <- theta - lr * d)",
    "combo.clash": "{a} clashes with {b}: {why}",
    # code generation
    "codegen.unsupported": "code generation for {what} is not available ({why}); "
    "`curvc explain` shows its update rule",
    "codegen.unknown_backend": "unknown backend {name!r}; choose one of {allowed}",
    "codegen.unknown_stage": "unknown stage {name!r} for --dump; choose one of {allowed}",
    # routed specs (curvc/routing.py)
    "route.incomplete": "a routed spec needs {missing}",
    "route.one_plan": "a routed spec has one plan per pipeline ({pipelines}): lower each "
    "pipeline's optimizer, to_plan(spec.pipeline(NAME).opt)",
    "route.duplicate_pipeline": "pipeline {name!r} is defined twice",
    "route.spec_not_found": "pipeline {name!r}: no spec {ref!r} (a shipped spec, or "
    "a .curv file beside this one)",
    "route.nested": "pipeline {name!r}: {ref!r} is itself a routed spec; a pipeline is one "
    "optimizer (name its pipelines here instead)",
    "route.whole_model": "pipeline {name!r}: {ref!r} reads the whole model (its layers, or "
    "all parameters as one vector), so it cannot share the parameters with other pipelines",
    "route.unknown_hyper": "{ref!r} has no hyperparameter {name!r}; its hyperparameters: "
    "{allowed}",
    "route.bad_mapping": "{why}",
    "route.unknown_pipeline": "no pipeline named {name!r}; pipelines: {allowed}",
    "route.bad_property": "a rule cannot read {name!r}: {why}",
    "route.two_otherwise": "two routes say `otherwise`; one takes every parameter no rule "
    "takes",
    "route.unrouted_pipeline": "pipeline {name!r} has no route: add `route {name} when RULE` "
    "(or `route {name} otherwise`)",
    "route.overlap": "a parameter of {example} is taken by route {first} (line {line}) and "
    "by route {second}",
    "route.never_matches": "route {pipeline} takes no parameter: `{rule}` is false for every "
    "shape and flag",
    # running: a compiled optimizer used where its step has no meaning
    "runtime.zero_partitioned": "{name}'s {what} cannot run under ZeroRedundancyOptimizer, "
    "which partitions the parameters over the ranks (no rank holds them all); use "
    "DistributedDataParallel with {name} itself (every rank keeps every parameter)",
    # loading
    "load.not_found": "no spec named {name!r}; shipped specs: {allowed}",
    # files: reading specs, writing modules, the cache
    "load.no_such_file": "no such spec file: {file}",
    "load.not_a_file": "{file} is not a spec file (it is a folder or a device)",
    "load.unreadable": "cannot read {file}: {why}",
    "load.not_utf8": "{file} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); "
    "a spec is a UTF-8 text file",
    "load.binary": "{file} is a binary file (it contains NUL bytes), not a spec",
    "output.not_a_folder": "the output folder {path} is a file; -o names a folder",
    "output.unwritable": "cannot write {path}: {why}",
    "cache.unusable": "not caching compiled optimizers in {path} ({why}); compiling in memory "
    "(set CURVC_CACHE_DIR to a folder of your own)",
    "cache.unwritable": "cannot write to the cache {path} ({why}); compiling in memory "
    "(set CURVC_CACHE_DIR to a folder of your own)",
}


def suggest(name: str, candidates) -> str | None:
    """The closest candidate, for a "did you mean" hint."""
    candidates = list(candidates)
    # A ratio >= 0.6 needs len(name) <= 2.33 * len(candidate); skipping longer
    # names changes no answer and keeps difflib from indexing a 100 MB word.
    if not candidates or len(name) > 3 * max(len(c) for c in candidates):
        return None
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


# An error quotes at most this many characters of the spec's text, in a field
# (a name, a number) and in the quoted line, so a 100 MB literal gives a short message.
QUOTE_LIMIT = 200
# The fields that carry the spec's own text; the others are the compiler's words
# (why, allowed, expected, ...), clipped only far above anything it writes.
_SPEC_TEXT_FIELDS = frozenset({"found", "text", "name", "value", "tuple", "entries"})
_FIELD_LIMIT = 10 * QUOTE_LIMIT
ELLIPSIS = "..."


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text``, its middle replaced by '...' when longer than ``limit``."""
    if len(text) <= limit:
        return text
    head = (limit - len(ELLIPSIS)) // 2
    tail = limit - len(ELLIPSIS) - head
    return text[:head] + ELLIPSIS + text[len(text) - tail:]


def _clip_field(name: str, value):
    if not isinstance(value, str):
        return value
    return clip(value, QUOTE_LIMIT if name in _SPEC_TEXT_FIELDS else _FIELD_LIMIT)


def _printable(line: str) -> str:
    """A source line safe to print: control characters (\\r, \\x0c, ...) shown as '?'."""
    return "".join(c if c == "\t" or c.isprintable() else "?" for c in line)


def _line(source: str, number: int) -> str | None:
    """Line ``number`` (1-based) of ``source``, lines ended by "\\n" only as the parser
    counts them (str.splitlines would also split at \\x0c, \\u2028, ... and quote the
    wrong line). Counts newlines chunk by chunk in C, so a 20 MB spec costs no list."""
    start, chunk = 0, 1 << 16
    remaining = number - 1
    while remaining:
        block_end = min(len(source), start + chunk)
        found = source.count("\n", start, block_end)
        if found >= remaining:
            for _ in range(remaining):
                start = source.index("\n", start) + 1
            break
        if block_end == len(source):
            return None
        remaining -= found
        start = block_end
    end = source.find("\n", start)
    return source[start:] if end < 0 else source[start:end]


def _quote(line: str, column: int, width: int) -> tuple[str, str]:
    """The quoted line and its caret line; a long line shows a window around the caret."""
    first = column - 1  # 0-based index of the caret's first character
    shown, lead = line, ""
    if len(line) > QUOTE_LIMIT:
        begin = max(0, min(first - QUOTE_LIMIT // 4, len(line) - QUOTE_LIMIT))
        shown = line[begin:begin + QUOTE_LIMIT]
        if begin:
            shown, lead = ELLIPSIS + shown, ELLIPSIS
        if begin + QUOTE_LIMIT < len(line):
            shown += ELLIPSIS
        first -= begin
    shown = _printable(shown)
    width = max(1, min(width, QUOTE_LIMIT - first))
    # Keep tabs in the padding so the caret lines up under them.
    body = shown[len(lead):]
    pad = " " * len(lead) + "".join(c if c == "\t" else " " for c in body[:first])
    pad += " " * max(0, first - len(body))
    return shown.rstrip(), pad + "^" * width


class CurvError(Exception):
    """A mistake in a spec (or in how it is used), with its place in the source."""

    def __init__(self, key: str, span: Span | None = None, source: str | None = None,
                 hint: str | None = None, **fields):
        self.key = key
        self.span = span
        self.source = source
        # Fields and hints may carry the spec's text (a name, a number): clipped.
        self.hint = clip(hint, _FIELD_LIMIT) if hint else hint
        self.fields = {k: _clip_field(k, v) for k, v in fields.items()}
        self.message = MESSAGES[key].format(**self.fields)
        super().__init__(self.render())

    def with_source(self, source: str) -> "CurvError":
        """The same error, able to quote the line it points at."""
        if self.source is None:
            self.source = source
            self.args = (self.render(),)
        return self

    def render(self) -> str:
        span = self.span
        if span is None:
            text = f"error: {self.message}"
        elif span.line == 0:
            text = f"{span.file}: error: {self.message}"
        else:
            text = f"{span.file}:{span.line}:{span.column}: error: {self.message}"
            line = _line(self.source or "", span.line) if span.column > 0 else None
            if line is not None:
                width = 1
                if span.end_line == span.line and span.end_column > span.column:
                    width = span.end_column - span.column
                quoted, caret = _quote(line.removesuffix("\r"), span.column, width)
                text += f"\n    {quoted}\n    {caret}"
        if self.hint:
            text += f"\n{self.hint}"
        return text

    def __str__(self) -> str:
        return self.render()
