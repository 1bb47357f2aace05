"""Nothing from a spec reaches generated code as raw text.

A spec carries text in: the optimizer's name, hyperparameter names, enum
words, comments, numbers, and the file name the caller passes. Each attempt
below tries to smuggle a Python payload through one of them. It must either
be refused with ``CurvError``, or produce a module that

* compiles, imports and steps without running the payload (the payload
  would set ``builtins.PWNED`` or create a marker file), and
* holds the payload only inside ``#`` comments (checked on Python's own
  tokens, so a payload inside a string or in code is caught).

Names are identifiers by grammar, so they cannot carry code; that they cannot
shadow the generated module's names either is tests/test_namespaces.py's sweep.
"""
from __future__ import annotations

import builtins
import importlib.util
import io
import itertools
import tokenize
from pathlib import Path

import pytest
import torch

import curvc
from curvc.errors import CurvError

PAYLOAD = "setattr(__import__('builtins'), 'PWNED', 1)"
MARKER = "PWNED"

SGD = ("optimizer SGD\n"
       "hyper lr = 0.1, momentum = 0.9, weight_decay = 0.01\n"
       "curvature constant\n"
       "structure scalar\n"
       "length none\n"
       "momentum heavy_ball(momentum)\n"
       "decay l2(weight_decay)\n")


@pytest.fixture(autouse=True)
def no_payload_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a payload's marker file would land here
    if hasattr(builtins, MARKER):
        delattr(builtins, MARKER)
    yield
    ran = hasattr(builtins, MARKER)
    if ran:
        delattr(builtins, MARKER)  # keep the next test's check meaningful
    wrote = [p.name for p in tmp_path.iterdir() if p.name.startswith(MARKER)]
    assert not ran and not wrote, "the payload ran"


def assert_safe(source: str, file: str = "inj.curv") -> str | None:
    """Refused, or compiled into a module that keeps the payload in comments only.

    Returns the CurvError key when refused, else None.
    """
    try:
        text = curvc.to_module_source(source, file, "torch")
    except CurvError as e:
        str(e)  # renders, whatever the input
        return e.key
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if MARKER in tok.string or "__import__" in tok.string:
            assert tok.type == tokenize.COMMENT, (tokenize.tok_name[tok.type], tok.string)
    cls = _import_from_a_file(text)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 0.5)
    cls([p], fused=False).step()
    assert torch.isfinite(p).all()
    assert not hasattr(builtins, MARKER), "the payload ran"
    return None


_PROBES = itertools.count()


def _import_from_a_file(text: str) -> type:
    """Import the module the way ``curvc.load`` does: from a .py file (so the bytes on
    disk, decoded as Python decodes source files, are what runs)."""
    name = f"curvc_injection_probe_{next(_PROBES)}"
    path = Path.cwd() / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return next(v for v in vars(module).values()
                if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)
                and v.__module__ == name)


FILE_PAYLOAD = f"__import__('pathlib').Path('{MARKER}.txt').touch()"

# (where, spec text): each replaces part of a valid spec with a payload.
ATTEMPTS = {
    # the optimizer's name
    "name_call": SGD.replace("optimizer SGD", f"optimizer SGD({PAYLOAD})"),
    "name_newline": SGD.replace("optimizer SGD", f"optimizer SGD\n{PAYLOAD}"),
    "name_class_body": SGD.replace("optimizer SGD",
                                   f"optimizer SGD(object): pass\n{PAYLOAD}\nclass X"),
    "name_exec": SGD.replace("optimizer SGD", "optimizer exec"),
    "name_dunder": SGD.replace("optimizer SGD", "optimizer __import__"),
    # hyperparameter names and defaults
    "hyper_name": SGD.replace("weight_decay = 0.01", f"x = 1) or {PAYLOAD} or (y = 2"),
    "hyper_default": SGD.replace("weight_decay = 0.01", f"weight_decay = {PAYLOAD}"),
    "hyper_default_string": SGD.replace("weight_decay = 0.01", f"weight_decay = '{PAYLOAD}'"),
    "hyper_eval": SGD.replace("weight_decay = 0.01", "weight_decay = 0.01, eval = 1"),
    # enum words
    "enum_word": SGD.replace("curvature constant",
                             f"curvature hutchinson(distribution = rademacher'); {PAYLOAD}; ('"),
    "enum_name": SGD.replace("curvature constant",
                             "curvature hutchinson(distribution = __import__)"),
    # numbers
    "number_call": SGD.replace("lr = 0.1", f"lr = 1e3){PAYLOAD}"),
    "number_suffix": SGD.replace("lr = 0.1", f"lr = 1e-3; {PAYLOAD}"),
    "number_underscore": SGD.replace("lr = 0.1", "lr = 1_000"),
    "number_hex": SGD.replace("lr = 0.1", "lr = 0x10"),
    "number_complex": SGD.replace("lr = 0.1", "lr = 1e3j"),
    "number_attr": SGD.replace("lr = 0.1", "lr = 1e3.real"),
    "argument_number": SGD.replace("heavy_ball(momentum)", f"heavy_ball(0.5 + {PAYLOAD})"),
    "modifier": SGD.replace("heavy_ball(momentum)", f"heavy_ball(momentum) {PAYLOAD}"),
    # comments: every character that ends a line somewhere
    "comment_plain": f"# {PAYLOAD}\n" + SGD,
    "comment_triple_quotes": f'# """\n# {PAYLOAD}\n# """\n' + SGD,
    "comment_triple_quotes_inline": SGD.replace("length none", f'length none  # """ + {PAYLOAD} + """'),
    "comment_single_quotes": f"# '''\n# {PAYLOAD}\n" + SGD,
    "comment_cr": f"# harmless\r{PAYLOAD}\n" + SGD,
    "comment_cr_inline": SGD.replace("length none", f"length none  # x\r{PAYLOAD}"),
    "comment_crlf_file": (f"# x\r\n# y\r{PAYLOAD}\r\n" + SGD).replace("\n", "\r\n"),
    "comment_form_feed": f"# harmless\x0c{PAYLOAD}\n" + SGD,
    "comment_vertical_tab": f"# harmless\x0b{PAYLOAD}\n" + SGD,
    "comment_line_separator": f"# harmless\u2028{PAYLOAD}\n" + SGD,
    "comment_paragraph_separator": f"# harmless\u2029{PAYLOAD}\n" + SGD,
    "comment_next_line": f"# harmless\x85{PAYLOAD}\n" + SGD,
    "comment_file_separator": f"# harmless\x1c{PAYLOAD}\n" + SGD,
    "statement_after_backslash": f"# harmless \\\n{PAYLOAD}\n" + SGD,
    "comment_backslash_end": SGD.replace("length none", "length none  # \\"),
    "comment_null": f"# harmless\x00{PAYLOAD}\n" + SGD,
    "comment_at_eof": SGD + f"# \r{PAYLOAD}",
    "comment_encoding_cookie": f"# -*- coding: rot13 -*-\n# {PAYLOAD}\n" + SGD,
    "comment_bidi": f"# \u202e{PAYLOAD}\u202c\n" + SGD,
    # a payload as spec code on its own line
    "statement": SGD + f"{PAYLOAD}\n",
    "statement_indented": SGD + f"    {PAYLOAD}\n",
}


@pytest.mark.parametrize("where", sorted(ATTEMPTS))
def test_spec_text_cannot_inject(where):
    assert_safe(ATTEMPTS[where])


# Outcomes pinned, so a refusal silently turning into acceptance is noticed.
# A \r ends a line as in a file read with universal newlines (so CR-only files
# parse): the payload after it is a line of code, refused by the parser.
CR_ENDS_THE_COMMENT = {"comment_cr", "comment_cr_inline", "comment_crlf_file", "comment_at_eof"}
# A hyperparameter called `eval` is harmless: spec names enter generated code prefixed.
ACCEPTED = ({k for k in ATTEMPTS if k.startswith("comment_")} | {"hyper_eval"}) - CR_ENDS_THE_COMMENT


@pytest.mark.parametrize("where", sorted(ATTEMPTS))
def test_which_attempts_are_refused(where):
    key = assert_safe(ATTEMPTS[where])
    assert (key is None) == (where in ACCEPTED), key


FILES = [
    f"evil\n{PAYLOAD}\n#.curv",
    f"evil\r{PAYLOAD}.curv",
    f'evil"""\n{PAYLOAD}\n""".curv',
    f"evil'''\n{PAYLOAD}.curv",
    f"evil\u2028{PAYLOAD}.curv",
    f"evil\x85{PAYLOAD}.curv",
    f"evil\x0c{PAYLOAD}.curv",
    f"evil\\\n{PAYLOAD}.curv",
    f"evil' + {PAYLOAD} + '.curv",
    f"evil\x00{PAYLOAD}.curv",
    f"{{{PAYLOAD}}}.curv",
    f"%s%r{PAYLOAD}.curv",
]


# A coding cookie: the file name lands on line 1 of the generated module, where
# Python honours "coding: ..." when it reads the module from disk.
COOKIE_FILES = [
    f"x -*- coding: unicode_escape -*-\n{PAYLOAD}#.curv",
    "x -*- coding: utf-7 -*-.curv",
]


@pytest.mark.parametrize("file", FILES + COOKIE_FILES, ids=lambda f: repr(f)[:40])
def test_file_name_cannot_inject(file):
    assert assert_safe(SGD, file) is None
    assert assert_safe(FILE_PAYLOAD.join(["# ", "\n"]) + SGD, file) is None


@pytest.mark.parametrize("file", FILES, ids=lambda f: repr(f)[:40])
def test_file_name_in_error_messages(file):
    """An error names the file as given; rendering never fails or evaluates it."""
    with pytest.raises(CurvError) as info:
        curvc.to_ir(SGD.replace("structure scalar", "structure scaler"), file)
    assert str(info.value).startswith(f"{file}:4:11: error: unknown structure 'scaler'")


def test_payload_comment_text_is_kept_escaped():
    """The spec is quoted in the module header, escaped, one comment line per spec line."""
    text = curvc.to_module_source(f"# a\u2028b\x1cc\x0cd\x00 {PAYLOAD}\n" + SGD, "inj.curv",
                                  "torch")
    # Every line boundary Python's str.splitlines knows starts a new comment line.
    assert "#   # a\n#   b\n#   c\n#   d\\x00 setattr(" in text
    for line in text.splitlines():
        if MARKER in line:
            assert line.lstrip().startswith("#"), line

# Names that would shadow the generated module's own: tests/test_namespaces.py.
