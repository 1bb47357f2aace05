"""The ``curvc`` command as a user runs it: exit codes, stdout/stderr, files written.

A user's mistake prints the compiler-style message on stderr and exits 1,
never a Python traceback. Most tests drive the Typer app in-process; one
runs ``python -m curvc`` in a subprocess, as a shell would.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import curvc
from curvc import explain
from curvc.cli import app

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "specs").rglob("*.curv"))


@pytest.fixture
def cli(monkeypatch):
    """Run ``curvc ARGS`` from the repository root; returns click's Result."""
    monkeypatch.chdir(ROOT)
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, list(args))
    return run


def expected_error(name: str) -> str:
    return (ROOT / "tests" / "errors" / f"{name}.err").read_bytes().decode()


def assert_clean_failure(result, stderr: str | None = None):
    assert result.exit_code == 1, result.output
    # click's runner turns typer.Exit(1) into SystemExit(1); anything else escaped.
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    if stderr is not None:
        assert result.stderr == stderr


# --- check ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["name_unknown_form", "syntax_misspelled_clause",
                                  "combo_secant_not_low_rank", "reserved_maximize"])
def test_check_bad_spec_prints_the_message_on_stderr(cli, case):
    result = cli("check", f"tests/errors/{case}.curv")
    assert_clean_failure(result, stderr=expected_error(case))
    assert result.stdout == ""


def test_check_bad_spec_in_a_subprocess():
    case = "syntax_unclosed_paren"
    proc = subprocess.run([sys.executable, "-m", "curvc", "check", f"tests/errors/{case}.curv"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == expected_error(case)
    assert "Traceback" not in proc.stderr


def test_check_shipped_specs(cli):
    result = cli("check", *SHIPPED)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(SHIPPED)
    for spec, line in zip(SHIPPED, lines):
        assert line.startswith(f"{spec}: ok ("), line


def test_check_reports_every_bad_spec_and_still_checks_the_good_ones(cli):
    result = cli("check", "tests/errors/name_unknown_form.curv", "specs/sgd.curv",
                 "tests/errors/value_ema_above_one.curv")
    assert_clean_failure(result, stderr=expected_error("name_unknown_form")
                         + expected_error("value_ema_above_one"))
    assert result.stdout == "specs/sgd.curv: ok (SGD)\n"


def test_check_a_shipped_spec_by_name(cli):
    result = cli("check", "adam")
    assert result.exit_code == 0, result.output
    assert "ok (Adam)" in result.stdout


@pytest.mark.parametrize("spec,needle", [("no_such_file.curv", "no such spec file"),
                                         ("no_such_spec", "no spec named 'no_such_spec'")])
def test_check_missing_spec(cli, spec, needle):
    result = cli("check", spec)
    assert_clean_failure(result)
    assert needle in result.stderr


# --- explain ----------------------------------------------------------------

@pytest.mark.parametrize("spec", SHIPPED)
def test_explain_prints_the_equations(cli, spec):
    result = cli("explain", spec)
    assert result.exit_code == 0, result.output
    opt = curvc.to_ir((ROOT / spec).read_text(), spec)
    assert result.stdout.startswith(f"{opt.name}  ({spec})")
    for line in explain.equations(opt):
        assert line in result.stdout
    assert "theta = theta - " in result.stdout or "theta = theta + t * d" in result.stdout


def test_explain_adam_spells_out_its_update(cli):
    out = cli("explain", "specs/adam.curv").stdout
    for line in ("c     = g * g", "C     = betas[1] * C + (1 - betas[1]) * c",
                 "P     = sqrt(C) + eps", "d     = m / P", "theta = theta - lr * d"):
        assert line in out


def test_explain_bad_spec(cli):
    result = cli("explain", "tests/errors/name_unknown_hyper.curv")
    assert_clean_failure(result, stderr=expected_error("name_unknown_hyper"))


# --- compile ----------------------------------------------------------------

def test_compile_refuses_an_uncompiled_combination_with_the_codegen_message(cli, tmp_path):
    result = cli("compile", "tests/errors/codegen_dense_momentum.curv", "-o", str(tmp_path),
                 "--backend", "torch")
    assert_clean_failure(result)
    err = result.stderr
    assert err.startswith("tests/errors/codegen_dense_momentum.curv:")
    assert "error: code generation for momentum heavy_ball with structure dense (HeavyNewton) " \
           "is not available" in err
    assert "`curvc explain` shows its update rule" in err
    assert not (tmp_path / "codegen_dense_momentum.py").exists()


def test_compile_codegen_refusal_matches_the_error_case(cli, tmp_path):
    result = cli("compile", "tests/errors/codegen_kfac_gradient_norm.curv", "-o", str(tmp_path),
                 "--backend", "torch")
    assert_clean_failure(result, stderr=expected_error("codegen_kfac_gradient_norm"))


def test_compile_sgd_writes_an_importable_optimizer(cli, tmp_path):
    result = cli("compile", "specs/sgd.curv", "-o", str(tmp_path), "--backend", "torch")
    assert result.exit_code == 0, result.output
    out = tmp_path / "sgd.py"
    assert result.stdout == f"wrote {out}\n"
    spec = importlib.util.spec_from_file_location("curvc_test_cli_sgd", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert issubclass(module.SGD, torch.optim.Optimizer)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, 0.5])
    module.SGD([p], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.tensor([0.95, -2.05]))


def test_compile_dump_lower_prints_the_plan(cli, tmp_path):
    result = cli("compile", "--dump", "lower", "specs/sgd.curv", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("Plan(name='SGD'")
    for field in ("validators=", "buffers=", "host=", "flags=", "stores="):
        assert field in out
    assert list(tmp_path.iterdir()) == []  # a dump writes nothing


@pytest.mark.parametrize("stage,start", [("parse", "SpecAST("), ("check", "Optimizer("),
                                         ("emit", "# -*- coding: utf-8 -*-\n# Generated by curvc")])
def test_compile_dump_other_stages(cli, stage, start):
    result = cli("compile", "--dump", stage, "--backend", "torch", "specs/adam.curv")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(start)


def test_compile_dump_unknown_stage(cli):
    result = cli("compile", "--dump", "optimize", "specs/sgd.curv")
    assert_clean_failure(result)
    assert result.stderr == ("error: unknown stage 'optimize' for --dump; "
                             "choose one of parse, check, lower, emit\n")


def test_compile_unknown_backend(cli, tmp_path):
    result = cli("compile", "specs/sgd.curv", "-o", str(tmp_path), "--backend", "cuda")
    assert_clean_failure(result)
    assert result.stderr == "error: unknown backend 'cuda'; choose one of torch, triton, auto\n"


def test_compile_bad_spec(cli, tmp_path):
    result = cli("compile", "tests/errors/value_every_zero.curv", "-o", str(tmp_path))
    assert_clean_failure(result, stderr=expected_error("value_every_zero"))
    assert not (tmp_path / "value_every_zero.py").exists()
