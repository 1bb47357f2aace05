"""Every error a spec can make, as data: ``tests/errors/NAME.curv`` beside ``NAME.err``.

``NAME.err`` holds the full rendered message (``str(CurvError)``: file, line,
column, the message, the quoted line, the caret, the hint) exactly as a user
sees it, for the file name ``tests/errors/NAME.curv``. Adding a case is
adding those two files. The first line of each ``.curv`` is a comment saying
what is wrong with it.

Each case runs through parse -> check -> lower: most are refused by the
first two; the ``codegen_*`` cases mean something but are not rendered yet,
and check refuses them with the message lowering would print.

To (re)write the ``.err`` files from what the compiler prints now::

    CURVC_UPDATE_ERRORS=1 python -m pytest tests/test_errors.py

then read every changed file (``git diff tests/errors``) before committing:
a message that is unclear or a caret in the wrong place is a bug to fix in
``curvc/parse.py``, ``curvc/check.py``, ``curvc/rules.py`` or ``curvc/errors.py``,
not a file to accept.
"""
from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

import pytest

import curvc
from curvc import errors, rules
from curvc.errors import CurvError

ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = Path(__file__).resolve().parent / "errors"
CASES = sorted(p.stem for p in CASES_DIR.glob("*.curv"))
UPDATE = os.environ.get("CURVC_UPDATE_ERRORS") == "1"


def _read(path: Path) -> str:
    # Bytes, not read_text(): universal newlines would turn a case's \r\n into \n.
    return path.read_bytes().decode("utf-8")


def run_case(name: str) -> CurvError:
    """The CurvError a case raises, compiled under its repo-relative file name."""
    source = _read(CASES_DIR / f"{name}.curv")
    file = f"tests/errors/{name}.curv"
    try:
        opt = curvc.to_ir(source, file)
        curvc.to_plan(opt)
    except CurvError as e:
        return e
    pytest.fail(f"{file} compiles without an error; a case in tests/errors/ must be refused")


@pytest.mark.parametrize("name", CASES)
def test_error_message(name):
    err = run_case(name)
    actual = str(err) + "\n"
    expected_path = CASES_DIR / f"{name}.err"
    if UPDATE:
        if not expected_path.exists() or _read(expected_path) != actual:
            expected_path.write_bytes(actual.encode("utf-8"))
        return
    if not expected_path.exists():
        pytest.fail(f"{expected_path.relative_to(ROOT)} is missing; write it with "
                    "CURVC_UPDATE_ERRORS=1 and review it")
    assert actual == _read(expected_path)


def test_enough_cases():
    assert len(CASES) >= 25


def test_every_case_has_both_files():
    stems_err = {p.stem for p in CASES_DIR.glob("*.err")}
    assert stems_err == set(CASES), "each NAME.curv needs a NAME.err and vice versa"


def test_every_case_says_why_on_its_first_line():
    for name in CASES:
        assert _read(CASES_DIR / f"{name}.curv").startswith("# "), name


@pytest.mark.parametrize("name", CASES)
def test_message_hygiene(name):
    """No parser internals, no broken grammar, a caret on every located error."""
    text = str(run_case(name))
    for leak in ("_NL", "$END", "Token(", "Tree(", "_HYPER", "_EVERY", "_OPTIMIZER",
                 "SIGNED_NUMBER", "LPAR", "RPAR", "unexpected the", "lark", "Traceback",
                 "None", "{", "}"):
        assert leak not in text, (leak, text)
    lines = text.split("\n")
    located = re.match(rf"tests/errors/{name}\.curv:(\d+):(\d+): error: ", lines[0])
    assert located or lines[0].startswith(f"tests/errors/{name}.curv: error: "), lines[0]
    if located:  # the line is quoted, with a caret under the fault
        assert lines[1].startswith("    ") and set(lines[2].strip()) == {"^"}, text
        assert lines[2].index("^") == 4 + int(located.group(2)) - 1, text


def _keys_and_frames():
    out = []
    for name in CASES:
        err = run_case(name)
        frames = {f.name for f in traceback.extract_tb(err.__traceback__)}
        out.append((name, err.key, frames))
    return out


def test_every_combination_rule_has_a_case():
    seen = {frame for _, key, frames in _keys_and_frames() if key == "combo.clash"
            for frame in frames}
    missing = [rule.__name__ for rule in rules.COMBINATION_RULES if rule.__name__ not in seen]
    assert not missing, f"no case in tests/errors/ triggers {missing}"


def test_every_refusal_has_a_case():
    """Each code-generation refusal is the one some case meets (most are named for it)."""
    seen = {}
    for name in CASES:
        if name.startswith("codegen_"):
            refusal = rules.first_refusal(curvc.to_ir(_read(CASES_DIR / f"{name}.curv"), name,
                                                       compilable=False))
            seen.setdefault(refusal.name, []).append(name)
    names = [r.name for r in rules.REFUSALS]
    assert len(set(names)) == len(names), "two refusals share a name"
    missing = [n for n in names if n not in seen]
    assert not missing, f"no case in tests/errors/ meets the refusals {missing}"
    for n in names:  # a case named for a rule is refused by that rule
        if (CASES_DIR / f"codegen_{n}.curv").exists():
            assert f"codegen_{n}" in seen[n], (n, seen[n])


def test_every_message_of_a_spec_has_a_case():
    """Each message a spec can cause is pinned by at least one case."""
    not_from_specs = {"codegen.unknown_backend", "codegen.unknown_stage", "load.not_found",
                      "syntax.index_too_large"}  # CLI options and a 10-digit index: tested elsewhere
    # reading and writing files, the cache: tests/test_cli.py and tests/test_cache.py
    not_from_specs |= {"load.no_such_file", "load.not_a_file", "load.unreadable", "load.not_utf8",
                       "load.binary", "output.not_a_folder", "output.unwritable",
                       "cache.unusable", "cache.unwritable"}
    not_from_specs |= {"runtime.zero_partitioned"}  # under ZeRO: tests/test_zero.py
    not_from_specs |= {"route.one_plan"}  # curvc.to_plan of a routed spec: tests/test_routing.py
    used = {key for _, key, _ in _keys_and_frames()}
    missing = set(errors.MESSAGES) - not_from_specs - used
    assert not missing, f"no case in tests/errors/ for {sorted(missing)}"


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("codegen_")])
def test_codegen_refusal_key(name):
    assert run_case(name).key == "codegen.unsupported"


def test_huge_index_is_a_curv_error():
    # Not a file case: 10,000 digits would make a poor .curv to review.
    src = ("optimizer X\nhyper lr = 1, b = (0.9, 0.99)\ncurvature empirical_fisher\n"
           f"structure diagonal\niterate ema(b[{'9' * 10000}])\nlength gradient_norm\n")
    with pytest.raises(CurvError) as info:
        curvc.to_ir(src, "huge.curv")
    assert info.value.key == "syntax.index_too_large"
