"""Generated modules on disk: keyed by what they are compiled from, verified, run from source.

A cached module is one file, ``<key>.py``, in the cache folder: a header line
(the key, the sha256 of the rest of the file, the class name) and the
generated module. The key hashes the spec's text, its file name, the backend
and the compiler's own sources, so a warm load reads the file, checks its
header and hash, and runs the text it read: no parse, check, lower or emit.

Nothing is imported by path: Python's import system would also trust a
``__pycache__/*.pyc`` beside the file whose header matches, so bytecode
planted there would run. The text is compiled here and its lines are
registered with ``linecache``, so tracebacks, ``inspect.getsource`` and
Triton's ``JITFunction`` (which reads its kernels' source) still work.

Trust: the folder is created 0700 (whatever the umask), and a folder not
owned by this user or writable by others is not used. A file that is not a
regular file of ours, not private, or whose hash or key does not match is
recompiled and replaced, never run. A folder that cannot be used or written
costs one warning and an in-memory compile. Files are written to a temporary
name and renamed into place, so two processes compiling at once never see a
half-written module.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import linecache
import os
import re
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, NamedTuple

from curvc.errors import MESSAGES
from curvc.version import __version__

HEADER = re.compile(r"# curvc-cache v1 key=(?P<key>[0-9a-f]{64}) sha256=(?P<sha>[0-9a-f]{64}) "
                    r"class=(?P<cls>[A-Za-z_][A-Za-z0-9_]*)")


class CacheWarning(UserWarning):
    """The cache folder could not be used; the optimizer was compiled in memory."""


def cache_dir() -> Path:
    root = os.environ.get("CURVC_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "curvc"


def cache_key(source: str, backend: str, file: str = "<spec>") -> str:
    """What a generated module is a function of: the spec, its file name (quoted in the
    module's header), the backend and the compiler."""
    h = hashlib.sha256()
    for part in (source, file, __version__, backend, _compiler_fingerprint()):
        h.update(part.encode("utf-8", "surrogatepass"))
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


def module_name(class_name: str) -> str:
    """``FisherAdam`` -> ``fisher_adam``, bounded (names may be hundreds of characters)."""
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", class_name).lower()[:64]


# --- writing ----------------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic swap (a moment's window)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then
    rename; the file gets ``mode`` less the umask (mkstemp alone would give 0600)."""
    # The temporary name is bounded: the target's own name may be near NAME_MAX.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:32]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8", "surrogatepass"))
            os.fchmod(f.fileno(), mode & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --- the folder ---------------------------------------------------------------------


def usable_dir() -> tuple[Path, str | None]:
    """The cache folder, and why it cannot be used (None when it can).

    Created 0700; an existing folder must be ours and not writable by others,
    since whoever can write there chooses the code ``load`` runs."""
    root = cache_dir()
    try:
        root.mkdir(mode=0o700, parents=True)
        os.chmod(root, 0o700)  # mkdir's mode is cut by the umask, never widened
    except FileExistsError:
        pass
    except OSError as e:
        return root, os_reason(e)
    try:
        st = os.stat(root)
    except OSError as e:
        return root, os_reason(e)
    if not stat.S_ISDIR(st.st_mode):
        return root, "it is not a folder"
    if _euid() is not None and st.st_uid != _euid():
        return root, "it belongs to another user"
    if st.st_mode & 0o022:
        return root, "other users can write to it"
    return root, None


def _euid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def _private(st: os.stat_result) -> bool:
    """A regular file of ours that nobody else can write."""
    owner_ok = _euid() is None or st.st_uid == _euid()
    return stat.S_ISREG(st.st_mode) and owner_ok and not st.st_mode & 0o022


def os_reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


_warned: set[tuple[str, str]] = set()


def _warn(key: str, **fields) -> None:
    """One warning per folder and reason per process: a loop of loads warns once."""
    text = MESSAGES[key].format(**fields)
    if (key, text) not in _warned:
        _warned.add((key, text))
        warnings.warn(CacheWarning(text), stacklevel=5)  # at the caller of load()


# --- reading ------------------------------------------------------------------------


def header(key: str, class_name: str, body: str) -> str:
    sha = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()
    return f"# curvc-cache v1 key={key} sha256={sha} class={class_name}\n"


def read_verified(path: Path, key: str) -> tuple[str, str] | None:
    """(class name, file text) of the cache file for ``key``, or None unless it is a
    private regular file of ours whose header names ``key`` and the hash of its body."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)  # no symlinks; a FIFO does not block the open
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not _private(os.fstat(f.fileno())):
            return None
        data = f.read()
    first, _, body = data.partition(b"\n")
    match = HEADER.fullmatch(first.decode("ascii", "replace"))
    if match is None or match["key"] != key or hashlib.sha256(body).hexdigest() != match["sha"]:
        return None
    try:
        return match["cls"], data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


class _SourceLoader:
    """Gives linecache the module's text again if its cache is cleared."""

    def __init__(self, text: str):
        self.text = text

    def get_source(self, name: str) -> str:
        return self.text


class Generated(NamedTuple):
    """What remakes a class ``run_source`` made: its module lives in sys.modules only, so
    no import finds it by name, and a pickled instance carries this instead."""

    key: str
    class_name: str
    text: str
    filename: str


# key -> the class run_source made for it last in this process (what curvc.load returns)
_RUN: dict[str, type] = {}


def run_source(text: str, class_name: str, key: str, filename: str) -> type:
    """Execute a generated module's text as a fresh module; return its optimizer class."""
    name = f"curvc_generated.{module_name(class_name)}_{key[:16]}"
    # dont_inherit: this file's `from __future__` flags must not leak into the module.
    code = compile(text, filename, "exec", dont_inherit=True)
    loader = _SourceLoader(text)
    module = ModuleType(name)
    module.__file__ = filename
    module.__loader__ = loader
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader, origin=filename)
    # mtime None: linecache never re-reads (or drops) these lines for a changed file.
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    cls = getattr(module, class_name)
    cls._generated = Generated(key, class_name, text, filename)
    _RUN[key] = cls
    return cls


class PicklesByModuleText:
    """Mixin of the runtime's optimizer bases: an instance of a class ``run_source`` made
    pickles (and deep-copies) as ``generated_instance`` of its ``Generated`` and torch's
    state; a compiled file's class, or a user's subclass, pickles by name as usual."""

    def __reduce_ex__(self, protocol):
        made = type(self).__dict__.get("_generated")
        if made is None:
            return super().__reduce_ex__(protocol)
        return generated_instance, tuple(made), self.__getstate__()


def generated_instance(key: str, class_name: str, text: str, filename: str):
    """A bare instance of a generated class (unpickling fills it in with __setstate__):
    of the class this process already made for ``key``, else of the pickled module's text
    run now. That text is the code the pickled optimizer ran, so its state fits it."""
    cls = _RUN.get(key) or run_source(text, class_name, key, filename)
    return cls.__new__(cls)


def load_class(key: str, build: Callable[[], tuple[str, str]]) -> type:
    """The optimizer class for ``key``: from its verified cache file, or else from
    ``build()`` (its class name and module text), stored for the next process."""
    root, why = usable_dir()
    path = root / f"{key[:32]}.py"
    if why is None:
        hit = read_verified(path, key)
        if hit is not None:
            return run_source(hit[1], hit[0], key, str(path))
    class_name, body = build()
    text = header(key, class_name, body) + body
    if why is not None:
        _warn("cache.unusable", path=root, why=why)
        return run_source(text, class_name, key, f"<curvc-generated {path.name}>")
    try:
        write_atomic(path, text)
    except OSError as e:
        _warn("cache.unwritable", path=root, why=os_reason(e))
        return run_source(text, class_name, key, f"<curvc-generated {path.name}>")
    return run_source(text, class_name, key, str(path))
