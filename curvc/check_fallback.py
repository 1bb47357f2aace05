"""Hyperparameter declarations (curvc.check): the names a hyperparameter may not take,
and a default that is another hyperparameter's number."""
from __future__ import annotations

import keyword

from curvc import ir, parse as ast
from curvc.errors import CurvError, suggest
from curvc.language import RESERVED_WHY


def reserved_hyper_why(name: str) -> str | None:
    """Why ``name`` cannot name a hyperparameter; None if it can."""
    if name in RESERVED_WHY:
        return RESERVED_WHY[name]
    if keyword.iskeyword(name):
        return "it is a Python keyword, and hyperparameters become Python keyword arguments"
    if name.startswith("_"):
        return "names starting with '_' are kept for the generated code"
    return None


def fallback(h: ir.Hyper, seen: dict) -> ir.Hyper:
    """``NAME = OTHER[i]``: a default that is another hyperparameter's number (SOAP's
    shampoo_beta = betas[1]); the constructor's default is None, read as that one's value."""
    ref = h.default
    other = seen.get(ref.name)
    what = f"the default of {h.name!r}"
    if other is None:
        close = suggest(ref.name, seen)
        raise CurvError("name.unknown_hyper", ref.span, name=ref.name,
                        hint=f"did you mean {close!r}?" if close else
                        "declare it with `hyper NAME = default`")
    d = other.default
    if isinstance(d, tuple) and ref.index is not None and ref.index < len(d) and \
            d[ref.index] is not None:
        default = d[ref.index]
    elif not isinstance(d, (tuple, str, ast.Ref, bool)) and d is not None and ref.index is None:
        default = d
    else:
        raise CurvError("value.wrong_kind", ref.span, what=what,
                        expected="a number, or another hyperparameter's number (NAME or "
                                 "NAME[i])", found=f"{ref.name}" + (
                                     f"[{ref.index}]" if ref.index is not None else ""))
    return ir.Hyper(h.name, default, h.span,
                    fallback=ir.HyperRef(ref.name, ref.index, ref.span))
