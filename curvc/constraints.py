"""Value constraints of hyperparameters, shared by the check pass (spec
defaults) and the runtime (constructor and param-group values)."""
from __future__ import annotations

from typing import Callable

CONSTRAINTS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "any": ("any number", lambda v: True),
    "nonneg": ("a number >= 0", lambda v: v >= 0),
    "positive": ("a number > 0", lambda v: v > 0),
    "unit": ("in [0, 1)", lambda v: 0 <= v < 1),
    "unit_closed": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "positive_int": ("a whole number >= 1", lambda v: v >= 1 and float(v).is_integer()),
}
