"""The runtime's step and the backends never name a curvature or a shipped optimizer.

What differs between curvature sources is data in ``curvc.runtime.estimators`` (what
each needs, what it yields, its messages); the step, the curvature plumbing and the
renderers read properties of that entry, so a new source or optimizer touches none of
them. Read as Python tokens: a curvature kind (a key of
``curvc.language.FORMS["curvature"]``) or an ``optimizer X`` name of specs/**/*.curv
must not appear as an identifier (whole, or as a ``_``-separated part such as
``kfac_updates``) or as a word of a string literal (docstrings included). Comments
may name them.
"""
import io
import re
import tokenize
from pathlib import Path

import pytest

from curvc.language import FORMS

ROOT = Path(__file__).resolve().parent.parent
SCANNED = [ROOT / "curvc/runtime/optimizer.py", ROOT / "curvc/runtime/curvature_sources.py",
           ROOT / "curvc/runtime/elementwise_step.py",
           *sorted((ROOT / "backends").rglob("*.py"))]

ALLOWED: set[tuple[str, str]] = set()  # (file, line) exemptions: none today


def _optimizer_names() -> set[str]:
    names = set()
    for spec in ROOT.glob("specs/**/*.curv"):
        names |= set(re.findall(r"^\s*optimizer\s+(\w+)", spec.read_text(), re.M))
    return names


WORDS = sorted(set(FORMS["curvature"]) | _optimizer_names())


def _hits(source: str) -> list[tuple[int, str, str]]:
    """(line, word, token) for every identifier or string naming one of WORDS."""
    lines = source.splitlines()
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            parts = tok.string.split("_")
            found = [w for w in WORDS if w == tok.string or
                     any("_".join(parts[i:i + w.count("_") + 1]) == w for i in range(len(parts)))]
        elif tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", None):
            found = [w for w in WORDS if re.search(rf"\b{w}\b", tok.string)]
        else:
            continue
        out += [(tok.start[0], w, lines[tok.start[0] - 1].strip()) for w in found]
    return out


def test_the_words_are_the_languages():
    assert {"hutchinson", "kfac", "empirical_fisher", "secant"} <= set(WORDS)
    assert {"Adam", "KFAC", "Shampoo", "LBFGS"} <= set(WORDS)


@pytest.mark.parametrize("source, expected", [
    ('if kind == "kfac":\n    pass\n', "kfac"),
    ("kfac_updates = ()\n", "kfac"),
    ("x = self._estimate_gauss_newton_bartlett()\n", "gauss_newton_bartlett"),
    ('msg = f"{name} is not an Adam"\n', "Adam"),
    ('"""Sophia-H\'s estimator."""\n', "Sophia"),
])
def test_a_kind_in_code_is_caught(source, expected):
    assert expected in [w for _, w, _ in _hits(source)]


def test_a_comment_or_a_longer_word_is_not_caught():
    assert _hits("# the kfac branch lived here\nhessians = kfaction = 1\n") == []


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_curvature_kind_or_optimizer_name_in(path):
    rel = str(path.relative_to(ROOT))
    hits = [(line, word, text) for line, word, text in _hits(path.read_text())
            if (rel, text) not in ALLOWED]
    assert not hits, "\n".join(f"{rel}:{line}: {word!r} in {text}" for line, word, text in hits)
