"""Names the generated module and its class take for themselves.

A spec's names reach generated code in two places where they cannot be
mangled: the constructor's keywords (the optimizer's API) and the class name
(a module global). Every other use of a spec name is prefixed by the
backends (``curvc.backends.render.scalar_name``), so it needs no list here.
"""
from __future__ import annotations

# Keyword-only arguments every compiled optimizer takes, with their defaults
# (the torch.optim keywords, then curvc's own).
CONSTRUCTOR_KEYWORDS: tuple[tuple[str, object], ...] = (
    ("maximize", False), ("foreach", None), ("fused", None), ("capturable", False),
    ("differentiable", False), ("state_dtype", None), ("nonfinite", "propagate"),
    ("curvature_group", None),  # the ranks curvature estimates are averaged over
)

# Extra keywords of the driver a structure selects (torch.optim.LBFGS's).
STRUCTURE_KEYWORDS: dict[str, tuple[tuple[str, object], ...]] = {
    "low_rank": (("max_eval", None), ("line_search_fn", None)),
}

# The constructor's own positional arguments.
CONSTRUCTOR_ARGUMENTS = ("self", "params")

# Module globals the generated code reads by name: the optimizer's class,
# bound last in the module, must not rebind one of them. Every other
# module-level name a generated module defines starts with '_', which no
# spec name may.
MODULE_IMPORTS = ("math", "torch", "triton", "tl", "CurvOptimizer", "matrix")


def keyword_names() -> set[str]:
    """Every keyword any compiled optimizer's constructor takes besides the spec's."""
    return ({n for n, _ in CONSTRUCTOR_KEYWORDS}
            | {n for kws in STRUCTURE_KEYWORDS.values() for n, _ in kws})


def constructor_keywords(structure: str) -> tuple[tuple[str, object], ...]:
    """The keyword-only arguments of an optimizer with this structure, in order."""
    return STRUCTURE_KEYWORDS.get(structure, ()) + CONSTRUCTOR_KEYWORDS
