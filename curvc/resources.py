"""Where the grammar and the shipped specs live, in a checkout or an installed wheel.

In the wheel, ``grammar/`` and ``specs/`` are package data of ``curvc``
(pyproject maps them to ``curvc/_grammar`` and ``curvc/_specs``); in a
checkout they sit beside the package.
"""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PKG / f"_{name}", _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"curvc is installed without its {name}/ folder")


def grammar_text() -> str:
    return (_find("grammar") / "curv.lark").read_text()


def specs_dir() -> Path:
    return _find("specs")


def shipped_specs() -> dict[str, Path]:
    """Shipped specs by name (file stem), theory rows included."""
    root = specs_dir()
    return {p.stem: p for p in sorted(root.rglob("*.curv"))}
