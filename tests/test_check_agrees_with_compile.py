"""`curvc check` refuses what `curvc compile` refuses, with the same message.

A spec that means something but that the code generator does not render yet
(``curvc.rules.REFUSALS``, the ``tests/errors/codegen_*`` cases) used to pass
``check`` and fail only at ``compile``. Every such case now fails ``check``
with the message ``compile`` prints; ``explain`` still shows its update rule,
which is where that message sends the user.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from curvc.cli import app

ROOT = Path(__file__).resolve().parent.parent
CODEGEN_CASES = sorted(p.stem for p in (ROOT / "tests" / "errors").glob("codegen_*.curv"))


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_there_are_codegen_cases():
    assert CODEGEN_CASES  # the glob found the cases the tests below run over


@pytest.mark.parametrize("case", CODEGEN_CASES)
def test_check_refuses_what_compile_refuses(cli, tmp_path, case):
    spec = f"tests/errors/{case}.curv"
    compiled = cli("compile", spec, "-o", str(tmp_path), "--backend", "torch")
    checked = cli("check", spec)
    assert compiled.exit_code == 1, compiled.output
    assert checked.exit_code == 1, checked.output
    assert "error: code generation for " in compiled.stderr
    assert checked.stderr == compiled.stderr
    assert checked.stdout == ""  # no "ok" line for a spec compile refuses


@pytest.mark.parametrize("case", CODEGEN_CASES)
def test_explain_still_shows_a_refused_spec(cli, case):
    result = cli("explain", f"tests/errors/{case}.curv")
    assert result.exit_code == 0, result.output
    assert "not compiled (" in result.stdout  # says so, then shows the rule
    assert "theta = theta " in result.stdout, result.stdout  # the update itself
