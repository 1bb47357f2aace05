"""The ``curvc`` command as a user runs it: exit codes, stdout/stderr, files written.

A user's mistake prints the compiler-style message on stderr and exits 1,
never a Python traceback. Most tests drive the Typer app in-process; one
runs ``python -m curvc`` in a subprocess, as a shell would.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import curvc
from curvc import explain, ir, routing
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
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)  # a hang guard only
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
    if routing.is_routed(opt):  # each pipeline's equations, under its routed names
        for p in opt.pipelines:
            assert f"pipeline {p.name} = {p.opt.name} " in result.stdout
            if all(isinstance(v, ir.HyperRef) and v.name == k for k, v in p.mapping):
                for line in explain.equations(p.opt):
                    assert line in result.stdout
        return
    for line in explain.equations(opt):
        assert line in result.stdout
    assert "theta = theta - " in result.stdout or "theta = theta + t * d" in result.stdout


def test_explain_adam_spells_out_its_update(cli):
    out = cli("explain", "specs/adam.curv").stdout
    for line in ("c     = g * g", "C     = betas[1] * C + (1 - betas[1]) * c",
                 "P     = sqrt(C_hat) + eps", "d     = m_hat / P", "theta = theta - lr * d"):
        assert line in out


def test_explain_bad_spec(cli):
    result = cli("explain", "tests/errors/name_unknown_hyper.curv")
    assert_clean_failure(result, stderr=expected_error("name_unknown_hyper"))


# --- compile ----------------------------------------------------------------

def test_compile_refuses_an_uncompiled_combination_with_the_codegen_message(cli, tmp_path):
    result = cli("compile", "tests/errors/codegen_dense_damping_floor.curv", "-o", str(tmp_path),
                 "--backend", "torch")
    assert_clean_failure(result)
    err = result.stderr
    assert err.startswith("tests/errors/codegen_dense_damping_floor.curv:")
    assert "error: code generation for damping floor with structure dense (FlooredNewton) " \
           "is not available" in err
    assert "`curvc explain` shows its update rule" in err
    assert not (tmp_path / "codegen_dense_damping_floor.py").exists()


def test_compile_codegen_refusal_matches_the_error_case(cli, tmp_path):
    result = cli("compile", "tests/errors/codegen_kfac_max_dim.curv", "-o", str(tmp_path),
                 "--backend", "torch")
    assert_clean_failure(result, stderr=expected_error("codegen_kfac_max_dim"))


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
    # the shared values first (%k = ...), then the plan that reads them
    assert out.startswith("%0 = ") and "\nPlan(name='SGD'" in out
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


# --- files: what a user may hand over, and where output may go -------------------------
# Each gets one line on stderr and exit 1: never a traceback, never a lost file.

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOT_UTF8 = b"optimizer Mine\nhyper lr = 0.1  # caf\xe9\ncurvature constant\n"
BINARY = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00>\x00"


@pytest.mark.parametrize("command", [["check"], ["explain"], ["compile", "--backend", "torch"],
                                     ["compile", "--dump", "parse"]])
def test_a_folder_as_spec(cli, command):
    result = cli(*command, "tests")
    assert_clean_failure(result, stderr="error: tests is not a spec file "
                                        "(it is a folder or a device)\n")


@pytest.mark.parametrize("command", [["check"], ["explain"], ["compile", "--backend", "torch"]])
def test_a_spec_that_is_not_utf8(cli, tmp_path, command):
    spec = tmp_path / "latin1.curv"
    spec.write_bytes(NOT_UTF8)
    result = cli(*command, str(spec))
    offset = NOT_UTF8.index(b"\xe9")
    assert_clean_failure(result, stderr=f"error: {spec} is not UTF-8 text (byte 0xe9 at offset "
                                        f"{offset}); a spec is a UTF-8 text file\n")


def test_a_binary_file_as_spec(cli, tmp_path):
    spec = tmp_path / "a.out"
    spec.write_bytes(BINARY)
    result = cli("check", str(spec))
    assert_clean_failure(result, stderr=f"error: {spec} is a binary file (it contains NUL "
                                        "bytes), not a spec\n")


def test_an_unreadable_spec(cli, tmp_path, monkeypatch):
    spec = tmp_path / "secret.curv"
    spec.write_text((ROOT / "specs" / "sgd.curv").read_text())
    if IS_ROOT:  # root reads through any mode bits: make the read itself fail
        real = Path.read_bytes

        def read_bytes(self):
            if self == spec:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)
        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    else:
        spec.chmod(0)
    result = cli("check", str(spec))
    assert_clean_failure(result, stderr=f"error: cannot read {spec}: permission denied\n")


def test_a_non_utf8_byte_deep_in_a_large_spec_is_located_exactly(cli, tmp_path):
    good = (ROOT / "specs" / "sgd.curv").read_bytes() + b"# " + b"x" * 20000 + b"\n"
    spec = tmp_path / "big.curv"
    spec.write_bytes(good + b"# \xff\n")
    result = cli("check", str(spec))
    assert_clean_failure(result)
    assert f"(byte 0xff at offset {len(good) + 2})" in result.stderr


def test_compile_into_a_read_only_folder(cli, tmp_path, monkeypatch):
    out = tmp_path / "read-only"
    out.mkdir()
    if IS_ROOT:  # root writes through any mode bits: refuse the write itself
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        out.chmod(0o555)
    result = cli("compile", "specs/sgd.curv", "-o", str(out), "--backend", "torch")
    assert_clean_failure(result, stderr=f"error: cannot write {out / 'sgd.py'}: "
                                        "permission denied\n")


def test_compile_onto_an_existing_file_leaves_it_alone(cli, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    result = cli("compile", "specs/sgd.curv", "-o", str(out), "--backend", "torch")
    assert_clean_failure(result, stderr=f"error: the output folder {out} is a file; "
                                        "-o names a folder\n")
    assert out.read_text() == "my notes\n"


def test_compile_a_spec_whose_file_name_is_240_characters(cli, tmp_path):
    stem = "s" * 240
    spec = tmp_path / f"{stem}.curv"
    spec.write_text((ROOT / "specs" / "sgd.curv").read_text())
    result = cli("compile", str(spec), "-o", str(tmp_path / "build"), "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "build" / f"{stem}.py").is_file()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o000, 0o644), (0o077, 0o600)])
def test_compiled_files_are_0644_at_most(cli, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        result = cli("compile", "specs/sgd.curv", "-o", str(tmp_path), "--backend", "torch")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for name in ("sgd.py", "__init__.py"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_bad_files_in_a_subprocess_print_one_line_each(tmp_path):
    latin1, binary = tmp_path / "latin1.curv", tmp_path / "a.out"
    latin1.write_bytes(NOT_UTF8)
    binary.write_bytes(BINARY)
    proc = subprocess.run([sys.executable, "-m", "curvc", "check", "tests", str(latin1),
                           str(binary), "specs/sgd.curv"], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)  # a hang guard only
    assert proc.returncode == 1
    assert proc.stdout == "specs/sgd.curv: ok (SGD)\n"
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), proc.stderr
