"""The README tells the truth: its specs compile, its error example is real,
its language table names every form, and CI runs its test command."""
import re
from pathlib import Path

import pytest

import curvc
from curvc.language import FORMS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```[a-z]*\n(.*?)^```$", README, flags=re.S | re.M)


@pytest.mark.parametrize("block", [b for b in BLOCKS
                                   if b.startswith("optimizer ") and "optimizer NAME" not in b],
                         ids=lambda b: b.split()[1])
def test_readme_specs_compile(block):
    opt = curvc.to_ir(block, "README.md")
    assert curvc.to_module_source(block, "README.md", "torch")
    assert opt.name


def test_readme_error_example_is_what_curvc_prints():
    example = next(b for b in BLOCKS if "error: " in b)
    source = "optimizer Mine\nhyper lr = 1\ncurvature empirical_fisher\nstructure diagnal\nlength none\n"
    with pytest.raises(curvc.CurvError) as err:
        curvc.to_ir(source, "specs/mine.curv")
    assert example.strip() == str(err.value).strip()


def test_readme_language_table_names_every_clause_and_form():
    table = README[README.index("## The language"):README.index("## Shipped specs")]
    for clause, forms in FORMS.items():
        assert f"`{clause}`" in table, clause
        for form in forms:
            assert f"`{form}`" in table, (clause, form)


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests.*?```\n(.*?)\n```", README, flags=re.S).group(1)
    assert "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_table_is_curvc_table():
    from typer.testing import CliRunner
    from curvc.cli import app
    table = CliRunner().invoke(app, ["table", "--markdown"]).output.strip()
    assert table in README
