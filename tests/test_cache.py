"""The cache of generated modules: it caches, it runs only what it verified, it is private.

A warm load (a new process, the file already there) reads the module and
checks its hash: no parse, check, lower or emit. Nothing is imported by path,
so bytecode planted beside a cached module never runs; a file whose body does
not match its header's hash is recompiled. The folder is created 0700; one
that others can write, that is a file, or that cannot be written costs one
warning and an in-memory compile, and the optimizer still works.
"""
from __future__ import annotations

import importlib.util
import inspect
import linecache
import marshal
import os
import struct
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import curvc
from curvc import cache, compiler, emit as emit_mod
from curvc.cache import CacheWarning

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh cache folder (not created yet), an empty in-process memo, no warnings sent."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CURVC_CACHE_DIR", str(path))
    compiler._load_cached.cache_clear()
    cache._warned.clear()
    yield path
    compiler._load_cached.cache_clear()
    cache._warned.clear()


@pytest.fixture
def emits(monkeypatch):
    """How many times the compiler ran (emit is its last stage)."""
    calls = []
    real = emit_mod.emit

    def counted(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)
    monkeypatch.setattr(emit_mod, "emit", counted)
    return calls


def sgd_steps_right(cls) -> bool:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, 0.5])
    cls([p], lr=0.1).step()
    return torch.equal(p.detach(), torch.tensor([1.0, -2.0]) - 0.1 * torch.tensor([0.5, 0.5]))


def cached_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.py"))


def in_child(folder: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter using ``folder`` as its cache."""
    env = {**os.environ, "CURVC_CACHE_DIR": str(folder)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)  # a hang guard only


# --- it caches ----------------------------------------------------------------------

WARM_CHILD = """
import sys
import curvc
from curvc import check, emit, lower, parse

def refuse(*args, **kwargs):
    raise SystemExit("the compiler ran on a warm cache")

parse.parse = check.check = lower.lower = emit.emit = refuse
print(curvc.load(sys.argv[1], backend="torch").__name__)
"""


def test_a_new_process_with_a_warm_cache_does_not_compile(folder):
    curvc.load("adam", backend="torch")  # cold: compiled and written
    proc = in_child(folder, WARM_CHILD, "adam")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Adam\n"


def test_a_cold_load_compiles_once_and_writes_one_file(folder, emits):
    cls = curvc.load("sgd", backend="torch")
    assert emits == ["SGD"] and sgd_steps_right(cls)
    files = cached_files(folder)
    assert len(files) == 1
    compiler._load_cached.cache_clear()
    again = curvc.load("sgd", backend="torch")
    assert emits == ["SGD"] and sgd_steps_right(again)  # read from the file, not compiled
    assert cached_files(folder) == files


def test_the_key_covers_spec_file_and_backend(folder, emits):
    curvc.load("sgd", backend="torch")
    curvc.load("sgd", backend="auto")
    spec = folder.parent / "sgd.curv"
    spec.write_text((ROOT / "specs" / "sgd.curv").read_text())
    curvc.load(str(spec), backend="torch")  # the same text, another file name in the header
    assert emits == ["SGD"] * 3 and len(cached_files(folder)) == 3


# --- it runs only what it verified ----------------------------------------------------

PLANT_CHILD = """
import sys
import curvc, torch
cls = curvc.load(sys.argv[1], backend="torch")
p = torch.nn.Parameter(torch.tensor([1.0])); p.grad = torch.tensor([0.5])
cls([p], lr=0.5).step()
print(cls.__name__, p.item())
"""


def plant_bytecode(py: Path, code) -> Path:
    """A timestamp .pyc for ``py`` whose header matches it: what SourceFileLoader trusts."""
    st = py.stat()
    pyc = Path(importlib.util.cache_from_source(str(py)))
    pyc.parent.mkdir(exist_ok=True)
    head = importlib.util.MAGIC_NUMBER + struct.pack(
        "<III", 0, int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
    pyc.write_bytes(head + marshal.dumps(code))
    return pyc


def test_bytecode_planted_beside_a_cached_module_never_runs(folder, tmp_path):
    curvc.load("sgd", backend="torch")
    mark = tmp_path / "the-planted-bytecode-ran"
    planted = compile(f"open({str(mark)!r}, 'w').close()\n", "<planted>", "exec")
    for py in cached_files(folder):
        plant_bytecode(py, planted)
    proc = in_child(folder, PLANT_CHILD, "sgd")
    assert not mark.exists()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "SGD 0.75\n"


def forged(key: str, body: str) -> bytes:
    """A cache file with a well-formed header for ``key`` and ``body``."""
    return (cache.header(key, "SGD", body) + body).encode()


@pytest.mark.parametrize("damage", ["code appended", "truncated", "another key",
                                    "writable by others", "a symlink"])
def test_a_damaged_cache_file_is_recompiled_never_run(folder, emits, tmp_path, damage):
    curvc.load("sgd", backend="torch")
    (path,) = cached_files(folder)
    good = path.read_bytes()
    _, body = good.split(b"\n", 1)
    if damage == "code appended":  # the header (key, hash) is kept: only the hash catches it
        path.write_bytes(good + b"raise SystemExit('the tampered module ran')\n")
    elif damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "another key":  # a valid file, filed under the wrong name
        other = cache.cache_key("optimizer Other", "torch")
        path.write_bytes(forged(other, body.decode()))
    elif damage == "writable by others":  # its hash and key are right: the mode refuses it
        source, file = compiler.read("sgd")
        path.write_bytes(forged(cache.cache_key(source, "torch", file), "SGD = None\n"))
        path.chmod(0o666)
    elif damage == "a symlink":
        target = tmp_path / "elsewhere.py"
        target.write_bytes(good)
        path.unlink()
        path.symlink_to(target)
    compiler._load_cached.cache_clear()
    cls = curvc.load("sgd", backend="torch")
    assert emits == ["SGD", "SGD"] and sgd_steps_right(cls)
    assert path.read_bytes() == good and not path.is_symlink()
    assert path.stat().st_mode & 0o777 & ~0o644 == 0


def test_the_module_runs_from_the_text_that_was_verified(folder):
    """Tracebacks and inspect see the lines that ran, with the file's line numbers."""
    cls = curvc.load("sgd", backend="torch")
    (path,) = cached_files(folder)
    lines = path.read_text().splitlines()
    assert inspect.getsourcefile(cls) == str(path)
    assert inspect.getsource(cls) in path.read_text()
    with pytest.raises(ValueError) as info:
        cls([torch.nn.Parameter(torch.ones(1))], lr=-1.0)
    frames = [f for f in traceback.extract_tb(info.tb) if f.filename == str(path)]
    assert frames and all(f.line == lines[f.lineno - 1].strip() for f in frames)
    linecache.clearcache()  # the module's loader gives the text back
    assert inspect.getsource(cls).startswith("class SGD(")


# --- Triton kernels read their own source --------------------------------------------

def triton_kernels(module) -> list:
    return [v for v in vars(module).values()
            if type(v).__module__.startswith("triton") and callable(getattr(v, "fn", None))]


@pytest.mark.parametrize("where", ["disk", "memory"])
def test_a_triton_module_loads_from_source_text_and_steps(folder, where):
    pytest.importorskip("triton")
    if where == "memory":  # a folder others can write: compiled in memory, with a warning
        folder.mkdir()
        folder.chmod(0o777)
        with pytest.warns(CacheWarning):
            cls = curvc.load("adam", backend="triton")
    else:
        cls = curvc.load("adam", backend="triton")
    module = sys.modules[cls.__module__]
    assert inspect.getsource(cls).startswith("class Adam(")
    kernels = triton_kernels(module)
    assert kernels, "the triton rendering defines @triton.jit kernels"
    for kernel in kernels:
        assert f"def {kernel.fn.__name__}(" in inspect.getsource(kernel.fn)
    if os.environ.get("TRITON_INTERPRET") != "1":
        return  # CUDA: the kernels take CUDA tensors; the triton tests cover those
    ref = torch.optim.Adam
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 7)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = cls(params, lr=0.1), ref(twins, lr=0.1)
    for step in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.cos(p.detach() * (step + 1))
            q.grad = torch.cos(q.detach() * (step + 1))
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


# --- a private folder -----------------------------------------------------------------

def test_the_folder_is_created_0700_and_files_0644_at_most_whatever_the_umask(folder):
    nested = folder / "deeper"
    os.environ["CURVC_CACHE_DIR"] = str(nested)  # restored by the fixture's monkeypatch
    old = os.umask(0)
    try:
        cls = curvc.load("sgd", backend="torch")
    finally:
        os.umask(old)
    assert sgd_steps_right(cls)
    assert nested.stat().st_mode & 0o777 == 0o700
    (path,) = cached_files(nested)
    assert path.stat().st_mode & 0o777 == 0o644


def one_cache_warning(spec: str = "sgd") -> tuple[type, str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cls = curvc.load(spec, backend="torch")
        curvc.load("adam", backend="torch")  # a second load: no second warning
    cache_warnings = [w for w in seen if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1, [str(w.message) for w in seen]
    assert sgd_steps_right(cls)
    return cls, str(cache_warnings[0].message)


def test_a_folder_others_can_write_is_not_used(folder):
    folder.mkdir()
    folder.chmod(0o777)
    cls, message = one_cache_warning()
    assert "other users can write to it" in message and "compiling in memory" in message
    assert list(folder.iterdir()) == []
    assert inspect.getsource(cls).startswith("class SGD(")


@pytest.mark.skipif(not IS_ROOT, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_is_not_used(folder):
    folder.mkdir(mode=0o700)
    os.chown(folder, 4242, 4242)
    _, message = one_cache_warning()
    assert "belongs to another user" in message
    assert list(folder.iterdir()) == []


def test_a_cache_dir_that_is_a_file_is_left_alone(folder):
    folder.write_text("my notes\n")
    _, message = one_cache_warning()
    assert str(folder) in message and "not a folder" in message
    assert folder.read_text() == "my notes\n"


def test_a_cache_dir_under_a_file(folder):
    folder.write_text("my notes\n")
    os.environ["CURVC_CACHE_DIR"] = str(folder / "sub")  # restored by the fixture
    _, message = one_cache_warning()
    assert "not a directory" in message
    assert folder.read_text() == "my notes\n"


def test_an_unwritable_cache_compiles_in_memory(folder, monkeypatch):
    folder.mkdir(mode=0o700)
    if IS_ROOT:  # root writes through any mode bits: refuse the write itself
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        folder.chmod(0o500)
    _, message = one_cache_warning()
    assert "cannot write to the cache" in message and "permission denied" in message
    assert cached_files(folder) == []


def test_an_unusable_cache_in_a_fresh_process_prints_one_line_no_traceback(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    proc = in_child(not_a_folder, PLANT_CHILD, "sgd")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "SGD 0.75\n"
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("CacheWarning") == 1


def test_an_optimizer_name_of_240_characters_loads(folder):
    name = "Long" * 60
    spec = folder.parent / "long.curv"
    spec.write_text((ROOT / "specs" / "sgd.curv").read_text().replace("optimizer SGD",
                                                                       f"optimizer {name}"))
    cls = curvc.load(str(spec), backend="torch")
    assert cls.__name__ == name and sgd_steps_right(cls)
    assert all(len(p.name) < 100 for p in folder.iterdir())
