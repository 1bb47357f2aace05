"""Lark's parse exceptions turned into ``CurvError``: file, line and column, what
the parser found, what it would have accepted (in words, in the context of the clause
being written), and hints for the usual slips (an unclosed parenthesis, a tuple of one).
"""
from __future__ import annotations

import re

import lark
from lark import Token

from curvc.errors import CurvError, Span, suggest
from curvc.language import CLAUSES, EXPRESSION_CLAUSES, FORMS


# How each terminal reads in an "expected ..." list, in the order they are listed
# ("<word>" is where a contextual description of a name or value goes).
_EXPECTED_NAMES = {
    "_OPTIMIZER": "'optimizer'", "_HYPER": "'hyper'",
    "CLAUSE": "a clause (" + ", ".join(CLAUSES) + ")",
    "EQUAL": "'='", "LPAR": "'('", "LSQB": "'['", "<word>": "",
    "NAME": "a name", "SIGNED_NUMBER": "a number", "INT": "an index (a whole number)",
    "TRUE": "true", "FALSE": "false", "MACHINE_EPS": "machine_eps",
    "RSQB": "']'", "COMMA": "','", "RPAR": "')'",
    "_LET": "'let'", "_STATE": "'state'", "_UPDATE": "'update'", "_INIT": "'init'",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "CARET": "'^'",
    "COMPARE": "a comparison", "UNSIGNED_NUMBER": "a number",
    "_EVERY": "'every'", "_ROUTED": "'routed'", "_PIPELINE": "'pipeline'", "_ROUTE": "'route'",
    "_WHEN": "'when'", "_OTHERWISE": "'otherwise'", "_NOT": "'not'", "_AND": "'and'",
    "_OR": "'or'", "EQUALITY": "an equality test (== or !=)",
    "_NL": "the end of the line", "$END": "the end of the spec",
}
_VALUE = frozenset({"SIGNED_NUMBER", "TRUE", "FALSE", "NAME"})
_DEFAULT = frozenset({"SIGNED_NUMBER", "TRUE", "FALSE", "LPAR", "MACHINE_EPS", "NAME"})


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _describe_expected(accepts, prev) -> str:
    """What the parser would have accepted, in words; ``prev`` is the token before."""
    acc = set(accepts)
    if len(acc) > 1:
        acc.discard("$END")  # the end of the line (or another clause) says it better
    prev_type = getattr(prev, "type", None)
    words: list[str] = []
    if _DEFAULT <= acc and prev_type == "EQUAL":
        acc -= _DEFAULT
        words.append("a default value (a number, true, false, a tuple like (0.9, 0.999) "
                     "or a word)")
    elif _VALUE <= acc:
        acc -= _VALUE
        if prev_type == "COMMA":
            acc.discard("_NL")  # an argument list may break after a comma; a value must follow
        words.append("a value (a number, true, false or a name)")
    if "NAME" in acc:
        if prev_type in ("_OPTIMIZER", "_ROUTED"):
            acc.discard("NAME")
            words.append("the optimizer's name")
        elif prev_type in ("_HYPER", "COMMA") and "RPAR" not in acc:
            acc -= {"NAME", "_NL"}  # a hyper line may break after a comma; a name must follow
            words.append("a hyperparameter's name")
        elif prev_type == "CLAUSE":
            acc -= {"NAME", "EQUAL"}
            words.append(_forms_of(str(prev)))
        elif "_EVERY" in acc:
            acc -= {"NAME", "_EVERY"}
            words.append("a modifier")
    order = list(_EXPECTED_NAMES)
    ranked = [(order.index("<word>"), w) for w in words]
    ranked += [(order.index(t) if t in order else len(order), _EXPECTED_NAMES.get(t, repr(t)))
               for t in acc]
    names = [text for _, text in sorted(ranked, key=lambda r: r[0])]
    return _join(names) if names else "something else"


def _forms_of(clause: str) -> str:
    forms = FORMS.get(clause, {})
    if not forms:
        return "a name"
    text = f"a {clause} form ({', '.join(forms)})"
    return text + " or `= EXPR`" if clause in EXPRESSION_CLAUSES else text


def _describe_token(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "$END":
        return "end of the spec"
    if tok.type in ("SIGNED_NUMBER", "INT"):
        return f"number {tok}"
    if tok.type == "NAME":
        return f"name {str(tok)!r}"
    return repr(str(tok))


# A line holding code: something other than white space before any '#'.
_CODE_LINE = re.compile(r"^[^\S\n]*[^\s#]", re.MULTILINE)
_PAREN_OR_COMMENT = re.compile(r"#[^\n]*|[()]")


def _blank(text: str, start: int = 0) -> bool:
    """Whether ``text[start:]`` (``start`` at a line end) holds only white space and comments."""
    return _CODE_LINE.search(text, start) is None


def _line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def _position(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of offset ``pos``."""
    return text.count("\n", 0, pos) + 1, pos - _line_start(text, pos) + 1


def _end_span(text: str, file: str, last: Token | None) -> Span:
    """Just after the last character of the spec that is not white space or a comment.

    ``last`` is the line end the parser read last: the one after the last line of
    code (with the blank and comment lines after it, one ``_NL`` token)."""
    if last is not None and last.start_pos is not None:
        start = _line_start(text, last.start_pos)
        code = text[start:last.start_pos].split("#", 1)[0].rstrip()
        if code:
            return Span(file, last.line, len(code) + 1, last.line, len(code) + 2)
    return Span(file, 1, 1, 1, 2)


def _open_paren(e) -> Token | None:
    """The '(' the parser has read and not yet closed, if any (it is on its stack)."""
    ip = getattr(e, "interactive_parser", None)
    stack = ip.parser_state.value_stack if ip is not None else []
    return next((t for t in stack if isinstance(t, Token) and t.type == "LPAR"), None)


def _unclosed_hint(text: str, e, pos: int) -> str | None:
    """Name the '(' still open at the end of the line holding offset ``pos``, if any
    (an argument list may continue on the next line after a comma, so it may have
    opened earlier). Every '(' before the open one the parser holds is closed, so
    the scan starts at that one, or at the line itself."""
    lpar = _open_paren(e)
    start = _line_start(text, min(pos, lpar.start_pos) if lpar is not None else pos)
    end = text.find("\n", pos)
    opened: list[int] = []
    for m in _PAREN_OR_COMMENT.finditer(text, start, len(text) if end < 0 else end):
        if m.group() == "(":
            opened.append(m.start())
        elif m.group() == ")" and opened:
            opened.pop()
    if not opened:
        return None
    at_line, column = _position(text, opened[-1])
    return f"the '(' at line {at_line}, column {column} is never closed"


def _prev_token(e) -> Token | None:
    """The last token the parser shifted before the error (line breaks skipped)."""
    ip = getattr(e, "interactive_parser", None)
    stack = ip.parser_state.value_stack if ip is not None else []
    for item in reversed(stack):
        if not isinstance(item, Token):
            return None
        if item.type != "_NL":
            return item
    return None


def _accepts(e) -> set[str]:
    ip = getattr(e, "interactive_parser", None)
    if ip is not None:
        return set(ip.accepts())
    return set(getattr(e, "expected", None) or getattr(e, "allowed", None) or ())


def syntax_error(e: lark.exceptions.UnexpectedInput, source: str, file: str) -> CurvError:
    accepts = _accepts(e)
    prev = _prev_token(e)
    expected = _describe_expected(accepts, prev)
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        span = Span(file, e.line, e.column, e.line, e.column + 1)
        return CurvError("syntax.unexpected_char", span, source, found=repr(e.char),
                         expected=expected, hint=_unclosed_hint(source, e, e.pos_in_stream))
    tok = getattr(e, "token", None)
    if tok is None or tok.type == "$END" or (tok.type == "_NL" and _blank(source, tok.start_pos)):
        if _blank(source):
            return CurvError("syntax.empty", Span(file), source)
        span = _end_span(source, file, tok)
        hint = _unclosed_hint(source, e, tok.start_pos) if tok is not None else None
        return CurvError("syntax.unexpected_eof", span, source, expected=expected, hint=hint)
    span = Span(file, tok.line, tok.column, tok.end_line or tok.line,
                tok.end_column or tok.column + 1)
    if tok.type == "_NL":  # point just after the line's last character, not at the newline run
        span = Span(file, tok.line, tok.column, tok.line, tok.column + 1)
    if "_OPTIMIZER" in accepts and prev is None:
        return CurvError("syntax.missing_header", span, source, found=_describe_token(tok))
    if {"_HYPER", "CLAUSE"} <= accepts:
        if tok.type == "NAME":
            close = suggest(str(tok), CLAUSES + ("hyper",))
            return CurvError("syntax.unknown_clause", span, source, found=repr(str(tok)),
                             clauses=", ".join(CLAUSES),
                             hint=f"did you mean {close!r}?" if close else None)
        hint = ("a spec file describes one optimizer; put another in its own file"
                if tok.type == "_OPTIMIZER" else None)
        return CurvError("syntax.unexpected_token", span, source, found=_describe_token(tok),
                         expected=expected, hint=hint)
    hint = _unclosed_hint(source, e, tok.start_pos)
    if tok.type == "RPAR" and accepts == {"COMMA"}:
        hint = "a tuple has two or more entries; write a single number without parentheses"
    return CurvError("syntax.unexpected_token", span, source, found=_describe_token(tok),
                     expected=expected, hint=hint)
