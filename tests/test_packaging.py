"""The wheel carries what a checkout has: every shipped spec, the grammar, every module.

Built from a copy of the sources (so the checkout gains no build/ folder) with
the installed setuptools, as ``.ci/run`` builds it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pyproject's package-dir: where each source folder lands inside the wheel
LAYOUT = {"curvc": "curvc", "backends": "curvc/backends", "grammar": "curvc/_grammar",
          "specs": "curvc/_specs"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", *LAYOUT):
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(item, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True,
                   capture_output=True, timeout=3600)  # a hang guard only
    (wheel,) = out.glob("curvc-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


@pytest.mark.parametrize("folder,pattern", [("specs", "*.curv"), ("grammar", "*.lark"),
                                            ("curvc", "*.py"), ("backends", "*.py")])
def test_the_wheel_has_every_file_of_the_checkout(wheel_names, folder, pattern):
    files = sorted((ROOT / folder).rglob(pattern))
    assert files
    missing = [str(f.relative_to(ROOT)) for f in files
               if f"{LAYOUT[folder]}/{f.relative_to(ROOT / folder).as_posix()}" not in wheel_names]
    assert missing == []


VERSIONS = """
import importlib.metadata as md, importlib.util, json
names = {d.metadata["Name"].lower() for d in md.distributions() if d.metadata["Name"]}
print(json.dumps({"versions": {n: md.version(n) for n in sorted(names)},
                  "curvc importable": importlib.util.find_spec("curvc") is not None}))
"""


def python_json(python: str, cwd: Path) -> dict:
    out = subprocess.run([python, "-c", VERSIONS], cwd=cwd, check=True, capture_output=True,
                         text=True, timeout=3600).stdout  # a hang guard only
    return json.loads(out)


def test_the_ci_wheel_check_venv_sees_this_interpreters_packages_not_its_curvc(tmp_path):
    """.ci/run's wheel venv, made as .ci/run makes it, from this interpreter (a venv or not)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=3600)
    child = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    site_dir = subprocess.run([child, "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], check=True, capture_output=True, text=True,
                              timeout=3600).stdout.strip()
    lines = subprocess.run([sys.executable, str(ROOT / ".ci" / "parent_site.py")], check=True,
                           capture_output=True, text=True, timeout=3600).stdout
    Path(site_dir, "_ci_parent_site_packages.pth").write_text(lines)
    ours, theirs = python_json(sys.executable, tmp_path), python_json(child, tmp_path)
    assert "torch" in theirs["versions"] and "lark" in theirs["versions"]
    assert theirs["versions"] == ours["versions"]  # the same packages, the same versions
    assert not theirs["curvc importable"]  # the wheel's curvc will be the only one
