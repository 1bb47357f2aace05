"""Golden dumps: every shipped spec's lowered plan and generated module, checked in.

A change to lowering or to a backend shows up as a diff of these files in
review, spec by spec, instead of only as a pass or fail of the numeric tests.
To rewrite them from what the compiler produces now::

    CURVC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

then read ``git diff tests/golden`` before committing: every changed line is a
change to what users run.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import curvc
from curvc import compiler, resources

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("CURVC_UPDATE_GOLDEN") == "1"
SPECS = {str(p.relative_to(resources.specs_dir()).with_suffix("")): p
         for p in resources.shipped_specs().values()}


def _dumps(name: str) -> dict[str, str]:
    path = SPECS[name]
    source = path.read_text()
    file = f"specs/{name}.curv"  # as a user in a checkout would name it
    return {"plan.txt": compiler.dump(source, file, "lower"),
            "py": curvc.to_module_source(source, file, "auto")}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_generated_code_matches_the_golden_dump(name):
    for suffix, text in _dumps(name).items():
        path = GOLDEN / f"{name.replace('/', '__')}.{suffix}"
        if UPDATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            continue
        assert path.exists(), f"no golden dump {path.name}: run with CURVC_UPDATE_GOLDEN=1"
        assert path.read_text() == text, (
            f"{path.name} changed: rerun with CURVC_UPDATE_GOLDEN=1 and review git diff")


def test_every_golden_dump_belongs_to_a_shipped_spec():
    expected = {f"{n.replace('/', '__')}.{s}" for n in SPECS for s in ("plan.txt", "py")}
    assert {p.name for p in GOLDEN.iterdir()} == expected



WIDTH = 100


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_line_of_the_generated_module_fits_in_100_columns(name):
    text = (GOLDEN / f"{name.replace('/', '__')}.py").read_text()
    spec_lines = SPECS[name].read_text().splitlines()
    long = [(n, line) for n, line in enumerate(text.splitlines(), 1) if len(line) > WIDTH
            # a quoted spec line may be as long as the spec's own line, no longer
            and not (line.startswith("#   ") and line[4:] in spec_lines)]
    assert not long, f"{name}: lines over {WIDTH} columns: {long[:3]}"
