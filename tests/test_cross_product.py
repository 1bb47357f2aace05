"""The language's whole cross product: every spec is refused with a reason, or compiles and trains.

Every curvature x structure x iterate x length x clip form of
``curvc.language.FORMS`` (``curvc.coverage.cross_product``, required arguments
filled by hyperparameters, other clauses at their defaults) goes through the
check stage ``curvc check`` runs. Each spec is either

* refused by the check stage with ``combo.clash`` (no meaning) or
  ``codegen.unsupported`` (not compiled yet), the message naming the clauses
  that clash; or
* accepted, and then it compiles (nothing passes check that compile refuses);
  and the accepted specs of ``TRAINED`` (every three-way combination of axis
  points among the accepted specs, see ``_trained``) train 5 steps of one generic
  training loop on a tiny MLP, with a finite loss and finite parameters that moved.

The ``codegen.unsupported`` refusals met are pinned in ``UNSUPPORTED`` below, so
a change that compiles new combinations shows it in this file's diff. It is empty:
issue 11's goal, every axis composing with every structure (the dense matrix with
every iterate, ema_or_sum on factored and K-FAC, the RMS clip of L-BFGS's direction),
the one combination without a meaning (the Hessian's Kronecker factors) a named rule.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import curvc
from curvc import coverage, rules
from curvc.cli import app
from curvc.language import FORMS, ArgSpec

# The code-generation refusals the cross product meets: refusal name -> number of specs
# (none: a refusal that comes back must be listed, with its count).
UNSUPPORTED: dict[str, int] = {}

# Accepted specs that do not train, as found: label -> why. (The five undamped instant
# diagonals that divided 0/0 at a zero gradient take the pseudo-inverse now.)
DIVERGES: dict[str, str] = {}

SPECS = coverage.cross_product()
STEPS = 5


def _case(spec: coverage.Spec):
    if spec.label not in DIVERGES:
        return spec
    # strict: a spec that starts training (or is refused) must leave the list
    return pytest.param(spec, marks=pytest.mark.xfail(reason=DIVERGES[spec.label], strict=True,
                                                      raises=(AssertionError, RuntimeError)))


# The check stage is deterministic in the spec's text, so `curvc coverage` (run by two
# tests below) reads the outcomes the fixture computed instead of classifying the whole
# product twice more; the CLI still counts and prints them itself.
_CLASSIFY = coverage.classify
_OUTCOMES: dict[str, coverage.Outcome] = {}  # spec source -> outcome


def _classify(spec: coverage.Spec) -> coverage.Outcome:
    if spec.source not in _OUTCOMES:
        _OUTCOMES[spec.source] = _CLASSIFY(spec)
    return _OUTCOMES[spec.source]


def _coverage_cli():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coverage, "classify", _classify)
        return CliRunner().invoke(app, ["coverage"])


@pytest.fixture(scope="module")
def outcomes() -> dict[str, coverage.Outcome]:
    return {spec.label: _classify(spec) for spec in SPECS}


def _points(spec: coverage.Spec) -> tuple:
    v = spec.variants or {}
    return tuple((axis, form, v.get(axis)) for axis, form in spec.forms.items())


def _trained(accepted: list[coverage.Spec], k: int = 3) -> set[str]:
    """The accepted specs that train: a greedy cover of every k-tuple of axis points
    (``kronecker(root = newton_schulz)`` one point) that some accepted spec has, so every
    three-way interaction of forms that compiles is stepped (129 of the 508 specs now);
    ties go to the spec whose label hashes first, which spreads the pick over the product.
    Every spec still compiles; the specs of DIVERGES always train."""
    tuples = {s.label: set(itertools.combinations(_points(s), k)) for s in accepted}
    key = {s.label: hashlib.sha256(s.label.encode()).hexdigest() for s in accepted}
    left = set().union(*tuples.values())
    chosen = set()
    while left:
        best = min(tuples, key=lambda label: (-len(tuples[label] & left), key[label]))
        chosen.add(best)
        left -= tuples[best]
    return chosen | set(DIVERGES)


@pytest.fixture(scope="module")
def trained(outcomes) -> set[str]:
    return _trained([s for s in SPECS if outcomes[s.label].key == coverage.ACCEPTED])


def test_the_trained_sample_covers_every_three_forms_of_the_accepted_specs(outcomes, trained):
    accepted = [s for s in SPECS if outcomes[s.label].key == coverage.ACCEPTED]
    assert trained <= {s.label for s in accepted} | set(DIVERGES)
    covered = set().union(*(itertools.combinations(_points(s), 3) for s in accepted
                            if s.label in trained))
    for s in accepted:
        assert set(itertools.combinations(_points(s), 3)) <= covered, s.label
    # every point of every axis that compiles at all is stepped
    assert {p for s in accepted for p in _points(s)} <= \
        {p for s in accepted if s.label in trained for p in _points(s)}


def test_the_product_is_every_form_of_every_axis():
    sizes = [len(coverage.points(axis)) for axis in coverage.AXES]
    assert len(SPECS) == math.prod(sizes) >= 1920
    assert coverage.points("structure").count(("kronecker", ("root", "newton_schulz"))) == 1
    assert len({s.label for s in SPECS}) == len(SPECS)
    for axis in coverage.AXES:
        assert {s.forms[axis] for s in SPECS} == set(FORMS[axis])


def test_required_arguments_are_hyperparameters_with_sensible_values():
    spec = next(s for s in SPECS if s.forms["iterate"] == "secant"
                and s.forms["clip"] == "global_norm")
    assert "iterate_history = 5" in spec.source
    assert "iterate   secant(history = iterate_history)" in spec.source
    assert "clip_threshold = 0.01" in spec.source  # >= 0 (0: no clip); 0.01 clips


def test_the_codegen_refusals_met_are_the_listed_ones(outcomes):
    met = Counter(o.rule for o in outcomes.values() if o.key == coverage.UNSUPPORTED)
    assert dict(met) == UNSUPPORTED, (
        "the specs the code generator refuses changed: update UNSUPPORTED (and the README's "
        f"counts, `curvc coverage`) to {dict(met.most_common())}")


def test_every_refusal_is_a_named_rule(outcomes):
    for label, o in outcomes.items():
        assert o.key in (coverage.ACCEPTED, coverage.CLASH, coverage.UNSUPPORTED), (label, o)
        assert (o.rule is None) == (o.key == coverage.ACCEPTED), (label, o)


def test_curvc_coverage_prints_the_counts(outcomes):
    result = _coverage_cli()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (f"{len(SPECS):,} specs: every form of "
                        + " x ".join(f"{len(coverage.points(a))} {a}" for a in coverage.AXES))
    accepted = sum(o.key == coverage.ACCEPTED for o in outcomes.values())
    assert re.fullmatch(rf"\s*accepted \(compiles\)\s+{accepted}", lines[1]), lines[1]
    for name, n in UNSUPPORTED.items():
        assert any(re.fullmatch(rf"\s+{name}\s+{n}", line) for line in lines), (name, n)
    clashes = Counter(o.rule for o in outcomes.values() if o.key == coverage.CLASH)
    assert set(clashes) <= {r.__name__.removeprefix("_rule_") for r in rules.COMBINATION_RULES}
    for name, n in clashes.items():
        assert any(re.fullmatch(rf"\s+{name}\s+{n}", line) for line in lines), (name, n)


def test_the_readme_shows_what_curvc_coverage_prints(outcomes):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    printed = _coverage_cli().stdout
    assert f"```\n{printed}```\n" in readme, (
        "README.md's `curvc coverage` block is out of date; paste this:\n" + printed)


def test_a_required_argument_without_a_sensible_value_is_named():
    with pytest.raises(KeyError, match="'odd'.*rate"):
        coverage._value(ArgSpec("rate", "number", constraint="odd"))


def test_the_diverging_specs_are_in_the_product():
    assert set(DIVERGES) <= {s.label for s in SPECS}


def _named_clauses(spec: coverage.Spec, message: str) -> list[str]:
    """The spec's clauses ('structure kronecker') the message's first line names."""
    head = message.split("\n")[0]
    return [f"{axis} {form}" for axis, form in spec.forms.items() if f"{axis} {form}" in head]


@pytest.mark.parametrize("spec", [_case(s) for s in SPECS], ids=lambda s: s.label)
def test_refused_with_the_clauses_that_clash_or_trains(spec, outcomes, trained, request):
    outcome = outcomes[spec.label]
    if outcome.key != coverage.ACCEPTED:
        assert spec.label not in DIVERGES, "refused now: remove it from DIVERGES"
        named = _named_clauses(spec, outcome.message)
        assert len(named) >= 2, f"the message does not name the clashing clauses:\n" \
                                f"{outcome.message}\n--- spec:\n{spec.source}"
        return
    path = request.getfixturevalue("tmp_path") / "cross_product.curv"  # only for the accepted
    path.write_text(spec.source)
    try:
        cls = curvc.load(path, backend="torch")  # (a) what check accepts compiles
    except curvc.CurvError as e:
        pytest.fail(f"passed check, refused by compile:\n{e}")
    if spec.label not in trained:
        return  # compiled; its forms' every three-way combination trains in another spec
    losses, moved, finite = _train(cls)  # (b) and trains
    assert all(math.isfinite(v) for v in losses), (losses, spec.source)
    assert finite, f"non-finite parameters after {STEPS} steps:\n{spec.source}"
    assert moved, f"no parameter moved in {STEPS} steps:\n{spec.source}"


# --- one training loop for every compiled optimizer --------------------------------


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    return model, x, y


def _train(cls) -> tuple[list[float], bool, bool]:
    """The loop the README tells users to write, the same for every spec: the model to
    the constructor, a closure that refreshes the curvature when the optimizer wants it
    (gradients with their graph; the logits and the loss for the estimators that take
    them) and ``step(closure)``, which L-BFGS evaluates several times."""
    model, x, y = _problem()
    start = [p.detach().clone() for p in model.parameters()]
    opt = cls(model, fused=False)

    def closure():
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        wants = opt.wants_curvature()
        if wants:
            opt.estimate_curvature(logits=logits, loss=loss)
        loss.backward(create_graph=wants)
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(STEPS)]
    params = list(model.parameters())
    moved = any(not torch.equal(p, q) for p, q in zip(params, start))
    return losses, moved, all(bool(torch.isfinite(p).all()) for p in params)
