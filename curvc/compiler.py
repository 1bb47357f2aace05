"""The pipeline, stage by stage: parse -> check -> lower -> emit.

``STAGES`` names each stage so ``curvc compile --dump STAGE`` can show the
program after it.
"""
from __future__ import annotations

import functools
import hashlib
import pprint
import re
from pathlib import Path

from curvc import cache, check as check_mod, emit as emit_mod, ir, lower as lower_mod
from curvc import parse as parse_mod, resources
from curvc.errors import CurvError
from curvc.plan import Plan

STAGES = ("parse", "check", "lower", "emit")


def resolve(spec: str | Path) -> Path:
    """A spec by path, or a shipped spec by name ('adam', 'theory/newton' or 'newton')."""
    p = Path(spec)
    if p.suffix == ".curv" or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"no such spec file: {p}")
        return p
    shipped = resources.shipped_specs()
    root = resources.specs_dir()
    by_rel = {str(path.relative_to(root).with_suffix("")): path for path in shipped.values()}
    key = str(spec)
    if key in by_rel:
        return by_rel[key]
    if key in shipped:
        return shipped[key]
    raise CurvError("load.not_found", name=key, allowed=", ".join(sorted(shipped)))


def read(spec: str | Path) -> tuple[str, str]:
    path = resolve(spec)
    return path.read_text(), str(path)


def to_ir(source: str, file: str = "<spec>") -> ir.Optimizer:
    return check_mod.check(parse_mod.parse(source, file))


def to_plan(opt: ir.Optimizer) -> Plan:
    try:
        return lower_mod.lower(opt)
    except CurvError as e:
        raise e.with_source(opt.source)


def to_module_source(source: str, file: str = "<spec>", backend: str = "auto") -> str:
    opt = to_ir(source, file)
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
    plan = to_plan(opt)
    if stage == "lower":
        return pprint.pformat(plan, width=100)
    return emit_mod.emit(opt, plan, backend)


def module_name(opt_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", opt_name).lower()


@functools.lru_cache(maxsize=None)
def _load_cached(source: str, file: str, backend: str):
    opt = to_ir(source, file)
    text = emit_mod.emit(opt, to_plan(opt), backend)
    key = cache.cache_key(source, backend)
    path = cache.cache_dir() / f"{module_name(opt.name)}_{key[:16]}.py"
    if not path.exists() or path.read_text() != text:
        cache.write_atomic(path, text)
    module = cache.import_path(path, f"curvc_generated.{path.stem}")
    return getattr(module, opt.name)


def load(spec: str | Path, backend: str = "auto"):
    """The optimizer class a spec describes, compiled (once per process) and imported.

    ``spec`` is a path to a ``.curv`` file or the name of a shipped spec::

        Adam = curvc.load("adam")
        opt = Adam(model.parameters(), lr=1e-3)
    """
    source, file = read(spec)
    return _load_cached(source, file, backend)


def compile_file(spec: str | Path, out_dir: str | Path = "build", backend: str = "auto") -> Path:
    """Write the generated module for ``spec`` to ``out_dir/<stem>.py``."""
    source, file = read(spec)
    text = to_module_source(source, file, backend)
    out = Path(out_dir) / f"{Path(file).stem}.py"
    cache.write_atomic(out, text)
    init = Path(out_dir) / "__init__.py"
    if not init.exists():
        cache.write_atomic(init, "")
    return out


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()
