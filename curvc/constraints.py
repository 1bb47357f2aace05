"""Value constraints of hyperparameters, shared by the check pass (spec
defaults) and the runtime (constructor and param-group values)."""
from __future__ import annotations

from typing import Callable


def _whole(low: int, high: int) -> tuple[str, Callable[[float], bool]]:
    # The range first: float() of a huge Python int would overflow.
    return (f"a whole number from {low} to {high}",
            lambda v: low <= v <= high and float(v).is_integer())


# Upper bounds on counts. Each count sizes a loop or an allocation at step time,
# so an absurd value (1e308) would hang or exhaust memory there; the bounds sit
# far above any useful setting and below where the runtime breaks.
COUNT_LIMITS = {
    # Monte-Carlo samples per refresh (Hutchinson probes, sampled labels): each is
    # a backward pass; AdaHessian and Sophia use 1, the literature at most ~100.
    "samples": 10_000,
    # L-BFGS pairs kept (torch.optim.LBFGS: 100); the history list is allocated
    # up front, and each pair holds two copies of the parameters.
    "history": 100_000,
    # Closure evaluations per L-BFGS step (torch.optim.LBFGS's max_iter: 20).
    "iterations": 1_000_000,
    # A Kronecker factor of one mode is max_dim x max_dim: 2**20 is already a
    # 4 TiB factor in float32, so a larger bound admits no further tensor.
    "max_dim": 2 ** 20,
    # Steps between refreshes: the step counter is a float32 (as in torch.optim),
    # exact only up to 2**24, so no longer period can ever fire a second time.
    "every": 2 ** 24,
    # Newton-Schulz steps, each two matrix products (Muon: 5; torch.optim.Muon refuses 100+).
    "newton_schulz_steps": 99,
}

CONSTRAINTS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "any": ("any number", lambda v: True),
    "nonneg": ("a number >= 0", lambda v: v >= 0),
    "positive": ("a number > 0", lambda v: v > 0),
    "nonpos": ("a number <= 0", lambda v: v <= 0),
    "unit": ("in [0, 1)", lambda v: 0 <= v < 1),
    "unit_closed": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "positive_int": ("a whole number >= 1", lambda v: v >= 1 and float(v).is_integer()),
    **{f"count_{name}": _whole(1, limit) for name, limit in COUNT_LIMITS.items()},
}
