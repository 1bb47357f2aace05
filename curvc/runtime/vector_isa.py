"""Inductor's vector-ISA probe, run once per machine instead of once per process.

Before its first C++ kernel in a process, inductor checks each vector ISA the CPU
reports (AVX-512, AVX2) by building a test library and loading it in a child Python:
about 1.5 s of the fused CPU path's 3 s cold first step. ``probed()`` wraps the fused
path's compile: where an earlier process on this machine, with this torch, saw the
probe pass for every ISA the CPU reports, inductor is told they are fine
(``cpp.vec_isa_ok``) and skips it; where it has not, the probe runs as usual and a
pass is recorded in curvc's cache folder. A later process that trusts the record and
finds another list of ISAs than it says drops the record, so the next one probes again.
A user's own ``TORCHINDUCTOR_VEC_ISA_OK`` (or config) is left to decide.
"""
from __future__ import annotations

import contextlib
import hashlib
import platform
import sys
from pathlib import Path

import torch


def _record() -> Path | None:
    """This machine's and torch build's record file, or None (no usable cache folder, or
    no /proc/cpuinfo to tell one CPU from another)."""
    from curvc import cache
    try:
        cpu = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    facts = [line for line in cpu.splitlines() if line.startswith(("model name", "flags"))][:2]
    root, why = cache.usable_dir()
    if why is not None or not facts:
        return None
    key = hashlib.sha256("\n".join([torch.__version__, torch.__file__, sys.version,
                                    platform.machine(), *facts]).encode()).hexdigest()
    return root / f"vec-isa-{key[:24]}"


def _isas() -> str:
    """The ISAs inductor takes as valid in this process (probed, or trusted)."""
    from torch._inductor import cpu_vec_isa
    return " ".join(str(isa) for isa in cpu_vec_isa.valid_vec_isa_list())


def _reported() -> str | None:
    """The ISAs the CPU reports, which trusting makes valid; None off x86 or where
    inductor's tables are not as expected."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch._inductor import cpu_vec_isa
        flags = cpu_vec_isa.x86_isa_checker()
        return " ".join(str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                        if all(f in flags for f in str(isa).split()))
    except Exception:  # noqa: BLE001 - an internal table moved: keep inductor's own probe
        return None


@contextlib.contextmanager
def probed():
    """The fused path's compile, with inductor's probe skipped where a record says it
    passes here (the module docstring)."""
    from torch._inductor import config
    record = _record()
    if record is None or config.cpp.vec_isa_ok is not None or _reported() is None:
        yield
        return
    try:
        seen = record.read_text().strip()
    except OSError:
        seen = None
    if seen:
        with config.patch({"cpp.vec_isa_ok": True}):
            yield
            if _isas() != seen:  # the record does not describe this machine after all
                record.unlink(missing_ok=True)
        return
    yield
    isas = _isas()
    if isas and isas == _reported():  # every ISA the CPU reports passed the probe
        from curvc import cache
        with contextlib.suppress(OSError):
            cache.write_atomic(record, isas + "\n")
