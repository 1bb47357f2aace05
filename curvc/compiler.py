"""The pipeline, stage by stage: parse -> check -> lower -> emit.

``STAGES`` names each stage so ``curvc compile --dump STAGE`` can show the
program after it.
"""
from __future__ import annotations

import functools
import pprint
from pathlib import Path
from typing import TYPE_CHECKING

from curvc import cache, check as check_mod, emit as emit_mod, ir, lower as lower_mod
from curvc import parse as parse_mod, plan_text, resources, routing, routing_emit
from curvc.backends import BACKENDS
from curvc.errors import CurvError, suggest
from curvc.plan import Plan

if TYPE_CHECKING:  # importing the runtime would import torch; `curvc check` needs neither
    from curvc.runtime.optimizer import CurvOptimizer

STAGES = ("parse", "check", "lower", "emit")


def resolve(spec: str | Path) -> Path:
    """A spec by path, or a shipped spec by name ('adam', 'theory/newton' or 'newton')."""
    p = Path(spec)
    if p.suffix == ".curv" or p.exists():
        if not p.exists():
            raise CurvError("load.no_such_file", file=p)
        if not p.is_file():
            raise CurvError("load.not_a_file", file=p)
        return p
    names = _shipped_by_name()
    key = str(spec)
    found = names.get(key) or names.get(key.lower())  # 'Adam' is 'adam'
    if found is not None:
        return found
    close = suggest(key.lower(), names)
    raise CurvError("load.not_found", name=key, allowed=", ".join(available()),
                    hint=f"did you mean {close!r}?" if close else None)


def _shipped_by_name() -> dict[str, Path]:
    """Shipped specs by relative name ('theory/newton') and by file stem ('newton')."""
    shipped = resources.shipped_specs()
    root = resources.specs_dir()
    by_rel = {str(path.relative_to(root).with_suffix("")): path for path in shipped.values()}
    return {**shipped, **by_rel}


def available() -> list[str]:
    """The names of the shipped specs, as ``curvc.load`` takes them ('adam', 'theory/newton')."""
    root = resources.specs_dir()
    return sorted(str(p.relative_to(root).with_suffix(""))
                  for p in resources.shipped_specs().values())


def read(spec: str | Path) -> tuple[str, str]:
    """A spec's text and file name; an unreadable or non-text file is a CurvError."""
    path = resolve(spec)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CurvError("load.unreadable", file=path, why=cache.os_reason(e)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # decoded whole, so e.start is the file's own offset
        raise CurvError("load.not_utf8", file=path, byte=data[e.start], offset=e.start) from None
    # Universal newlines, as open() in text mode would give (the parser counts "\n" lines).
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\0" in text:
        raise CurvError("load.binary", file=path)
    return text, str(path)


def to_ir(source: str, file: str = "<spec>", *, compilable: bool = True) -> ir.Optimizer:
    """The checked IR; ``compilable=False`` lets through what only code generation
    refuses (``curvc.check.check``), for ``explain``."""
    return check_mod.check(parse_mod.parse(source, file), compilable=compilable)


def to_plan(opt: ir.Optimizer) -> Plan:
    if routing.is_routed(opt):  # a plan per pipeline: the caller picks one
        raise CurvError("route.one_plan", opt.span, opt.source,
                        pipelines=", ".join(p.name for p in opt.pipelines))
    try:
        return lower_mod.lower(opt)
    except CurvError as e:
        raise e.with_source(opt.source)


def to_module_source(source: str, file: str = "<spec>", backend: str = "auto") -> str:
    opt = to_ir(source, file)
    if routing.is_routed(opt):
        return routing_emit.emit(opt, backend)
    return emit_mod.emit(opt, to_plan(opt), backend)


def dump(source: str, file: str, stage: str, backend: str = "auto") -> str:
    """The program after ``stage``, as text."""
    if stage not in STAGES:
        raise CurvError("codegen.unknown_stage", name=stage, allowed=", ".join(STAGES))
    ast = parse_mod.parse(source, file)
    if stage == "parse":
        return pprint.pformat(ast, width=100)
    opt = check_mod.check(ast)
    if stage == "check":
        return pprint.pformat(opt, width=100)
    if routing.is_routed(opt):  # each pipeline's plan, then the module
        return routing_emit.dump_plans(opt) if stage == "lower" else \
            routing_emit.emit(opt, backend)
    plan = to_plan(opt)
    if stage == "lower":
        return plan_text.format_plan(plan)
    return emit_mod.emit(opt, plan, backend)


@functools.lru_cache(maxsize=None)
def _load_cached(source: str, file: str, backend: str):
    """The class, from the verified cache file when there is one (no compile at all)."""
    def build() -> tuple[str, str]:
        opt = to_ir(source, file)
        return opt.name, to_module_source(source, file, backend)

    if backend not in BACKENDS:  # before the cache, which would only miss
        raise CurvError("codegen.unknown_backend", name=backend, allowed=", ".join(BACKENDS))
    # a routed spec's module holds its pipelines' texts: they are part of the key
    keyed = source + "".join(routing.pipeline_texts(source, file))
    return cache.load_class(cache.cache_key(keyed, backend, file), build)


def load(spec: str | Path, backend: str = "auto") -> type[CurvOptimizer]:
    """The optimizer class a spec describes, compiled (once per process) and imported.

    ``spec`` is a path to a ``.curv`` file or the name of a shipped spec::

        Adam = curvc.load("adam")
        opt = Adam(model.parameters(), lr=1e-3)
    """
    source, file = read(spec)
    return _load_cached(source, file, backend)


def compile_file(spec: str | Path, out_dir: str | Path = "build", backend: str = "auto") -> Path:
    """Write the generated module for ``spec`` to ``out_dir/<stem>.py`` (mode 0644)."""
    source, file = read(spec)
    text = to_module_source(source, file, backend)
    out_dir = Path(out_dir)
    out = out_dir / f"{Path(file).stem}.py"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        cache.write_atomic(out, text)
        init = out_dir / "__init__.py"
        if not init.exists():
            cache.write_atomic(init, "")
    except FileExistsError:
        raise CurvError("output.not_a_folder", path=out_dir) from None
    except OSError as e:
        raise CurvError("output.unwritable", path=out, why=cache.os_reason(e)) from None
    return out
