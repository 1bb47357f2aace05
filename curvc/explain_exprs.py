"""The expression language's lines of ``curvc explain``: lets, states and ``update``,
in the spec's own syntax (``language.show_apply``), in the order the step needs them."""
from __future__ import annotations

import re

from curvc import ir


# The symbols explain's equations assign (g, d, theta, ...). A hyperparameter of one of
# these names is marked while the lines are built and, where the same name is also printed
# as a symbol, shown as "(hyperparameter d)" (resolve_names): Adafactor's clip threshold d
# reads d = d / max(1, RMS(d) / (hyperparameter d)), not d = d / max(1, RMS(d) / d), while a
# threshold c, where no c is printed, stays c.
SYMBOLS = frozenset("A C E G H L M N P Q R S V X b c d f g m n s t u y theta".split())
_MARK = "\x00"
_MARKED = re.compile(_MARK + r"(\w+)" + _MARK)


def arg_text(a) -> str:
    """A clause argument (number or hyperparameter) as explain prints it; '?' if absent.
    A name explain also uses as a symbol comes back marked, for ``resolve_names``."""
    if a is None:
        return "?"
    if isinstance(a, ir.HyperRef) and a.index is None and a.name in SYMBOLS:
        return f"{_MARK}{a.name}{_MARK}"
    return str(a)


def resolve_names(lines: list[str]) -> list[str]:
    """``lines`` with each marked hyperparameter written as its name, or as
    "(hyperparameter NAME)" where the lines print NAME as a symbol too."""
    bare = _MARKED.sub("", "\n".join(lines))
    clash = {n for n in set(_MARKED.findall("\n".join(lines)))
             if re.search(rf"(?<![\w.]){n}(?!\w)", bare)}
    return [_MARKED.sub(lambda m: f"(hyperparameter {m[1]})" if m[1] in clash else m[1], s)
            for s in lines]


def _line(name: str, text: str) -> str:
    return f"{name:<5} = {text}"


def _reads(e, lets: dict, seen=None) -> set[str]:
    """Every name ``e`` reads this step, through lets (``old`` reads none)."""
    seen = set() if seen is None else seen
    if isinstance(e, ir.Var):
        if e.name in lets and e.name not in seen:
            seen.add(e.name)
            return {e.name} | _reads(lets[e.name], lets, seen)
        return {e.name}
    if isinstance(e, ir.Apply) and e.fn != "old":
        return set().union(*(_reads(a, lets, seen) for a in e.args)) if e.args else set()
    return set()


def after_direction(opt: ir.Optimizer) -> set[str]:
    """The lets and states whose value this step needs the direction d."""
    lets = {let.name: let.expr for let in opt.lets}
    exprs = {**lets, **{st.name: st.expr for st in opt.states}}
    late: set[str] = set()
    changed = True
    while changed:
        changed = False
        for n, e in exprs.items():
            if n not in late and _reads(e, lets) & (late | {"direction"}):
                late.add(n)
                changed = True
    return late


def definitions(opt: ir.Optimizer, late: bool) -> list[str]:
    """The lets and states computed before the direction (``late``: after it)."""
    after = after_direction(opt)
    out = []
    # in the spec's order, which is the order its author reads them in
    for d in sorted((*opt.lets, *opt.states), key=lambda d: (d.span.line, d.span.column)):
        if (d.name in after) != late:
            continue
        if isinstance(d, ir.Let):
            out.append(_line(d.name, str(d.expr)))
        else:
            init = "" if d.init == ir.Const(0.0) else f", {d.init} at t = 0"
            out.append(_line(d.name, str(d.expr))
                       + f"   (state: {d.name} on the right is the stored value{init})")
    return out


def update_line(opt: ir.Optimizer, lr: str) -> str | None:
    if opt.update is None:
        return None
    return f"theta = theta - {lr} * ({opt.update})"
