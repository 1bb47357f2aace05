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
    # a Table-1 row each, one per pipeline of a routed spec (MuonAdamW: Muon's and AdamW's)
    assert res.output.count("length: ") == len(curvc.available()) + 1
    assert "MuonAdamW/adamw: length:" in res.output
    assert "structure: LI" in res.output  # SGD's
    assert max(len(line) for line in res.output.splitlines()) < 160


def test_load_ignores_case_and_suggests_a_close_name():
    assert curvc.load("Adam") is curvc.load("adam")
    with pytest.raises(CurvError, match="did you mean 'adam'"):
        curvc.load("adamm")
    with pytest.raises(CurvError, match="did you mean 'theory/newton'|did you mean 'newton'"):
        curvc.load("newtn")


def test_param_groups_keep_biases_and_norm_layers_out_of_weight_decay():
    import torch
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3),
                                torch.nn.Linear(3, 2, bias=False))
    groups = curvc.param_groups(model, weight_decay=0.1)
    assert [p.shape for p in groups[0]["params"]] == [(3, 4), (2, 3)]  # the two weights
    assert groups[0]["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups[1]["params"]) == ["0.bias", "1.bias", "1.weight"]
    assert groups[1]["weight_decay"] == 0.0
    opt = curvc.load("adamw")(groups, lr=1e-2)  # a drop-in for torch's param groups
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    assert len(curvc.param_groups(torch.nn.Linear(2, 2, bias=False))) == 1  # no empty group


def test_every_optimizer_takes_the_model_as_well_as_its_parameters():
    import torch
    model = torch.nn.Linear(3, 2)
    for name in ("adam", "shampoo", "kfac"):
        opt = curvc.load(name)(model, lr=0.1)
        assert opt.param_groups[0]["params"] == list(model.parameters())
    assert opt._tracker is not None  # K-FAC hooked the layer
    assert curvc.load("adam")(model)._tracker is None
