"""Generated modules on disk: cached by content hash, written atomically, imported by path.

The key is a hash of (spec text, compiler version, backend): recompiling an
unchanged spec costs a file lookup. Files are written to a temporary name
and renamed into place, so two processes compiling at once never see a
half-written module. Modules are imported from their real file, so
tracebacks, ``inspect.getsource`` and Triton's ``JITFunction`` (which reads
the source) all work.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from curvc.version import __version__


def cache_dir() -> Path:
    root = os.environ.get("CURVC_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "curvc"


def cache_key(source: str, backend: str) -> str:
    h = hashlib.sha256()
    for part in (source, __version__, backend, _compiler_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _compiler_fingerprint() -> str:
    """A hash of the compiler's own sources, so editing curvc invalidates the cache."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        h = hashlib.sha256()
        here = Path(__file__).resolve().parent
        for root in (here, here.parent / "backends", here / "backends"):
            if root.is_dir():
                for f in sorted(root.rglob("*.py")):
                    h.update(f.read_bytes())
        _FINGERPRINT = h.hexdigest()
    return _FINGERPRINT


_FINGERPRINT = None


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def import_path(path: Path, name: str) -> ModuleType:
    """Import a generated module from its file, registered under ``name``."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
