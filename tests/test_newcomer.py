"""A newcomer's first commands: the version, the list of shipped specs, forgiving names."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

import curvc
from curvc import resources
from curvc.cli import app
from curvc.errors import CurvError


def test_version_prints_the_package_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"curvc {curvc.__version__}"


def test_available_names_every_shipped_spec_as_load_takes_it():
    names = curvc.available()
    assert len(names) == len(resources.shipped_specs())
    assert {"adam", "theory/newton", "hybrids/damped_newton"} <= set(names)
    for name in names:
        assert curvc.resolve(name).suffix == ".curv"


def test_list_shows_every_spec_with_its_class_and_description():
    res = CliRunner().invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    for name in curvc.available():
        assert name in res.output
    assert "Adam (Kingma & Ba, 2015) with torch.optim.Adam's semantics." in res.output
    assert res.output.count("length: ") == len(curvc.available())  # a Table-1 row each
    assert "structure: LI" in res.output  # SGD's
    assert max(len(line) for line in res.output.splitlines()) < 160


def test_load_ignores_case_and_suggests_a_close_name():
    assert curvc.load("Adam") is curvc.load("adam")
    with pytest.raises(CurvError, match="did you mean 'adam'"):
        curvc.load("adamm")
    with pytest.raises(CurvError, match="did you mean 'theory/newton'|did you mean 'newton'"):
        curvc.load("newtn")
