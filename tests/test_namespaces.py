"""Generated code owns its namespace: no spec name can take a name the backends use.

Every identifier that appears in any generated module (every shipped spec,
with the torch, foreach and Triton sections) is tried as a hyperparameter's
name in probe specs that exercise each execution path (the per-tensor torch
``update``, the foreach ``update``, the Triton kernels under the interpreter,
the Kronecker, secant and dense drivers), and as the optimizer's name. Each
try is either refused by ``check`` with a ``name.reserved_*`` message, or
steps to results bitwise equal to the same spec with a neutral name.
"""
from __future__ import annotations

import ast
import builtins
import functools
import io
import keyword
import tokenize

import pytest
import torch

import curvc
from curvc import names, resources
from curvc.errors import CurvError

# Probe specs. Their hyperparameters are slots {s0}, {s1}, ...: the reference
# fills every slot with a neutral name, a try fills them with probed names. Each
# slot is used in the arithmetic, so a name that shadowed a generated value (or
# took its place) would change the result. Slots of several kinds (a tuple, a
# boolean flag, an epsilon, a decay rate, a schedule) put a probed name everywhere a spec
# name can go.
PROBES = {
    "elementwise": (
        "optimizer {name}\nhyper lr = 0.1, {s0} = (0.9, 0.99), {s1} = 1e-8, {s2} = true, "
        "{s3} = 0.01\ncurvature empirical_fisher\nstructure diagonal\n"
        "iterate ema({s0}[1], keep_max = {s2}) bias_corrected\n"
        "momentum ema({s0}[0]) bias_corrected\nlength gradient_norm\ndamping add({s1})\n"
        "decay decoupled({s3})\nclip global_norm(1)\nschedule inverse_time({s3})\n",
        ("update", "foreach", "triton")),
    "normalized": ("optimizer {name}\nhyper lr = 0.1, {s0} = 0.9, {s1} = 0.01, {s2} = true\n"
                   "curvature constant\nstructure scalar\nlength normalized\n"
                   "momentum heavy_ball({s0}, nesterov = {s2})\ndecay l2({s1})\n",
                   ("update", "foreach")),
    "kronecker": ("optimizer {name}\nhyper lr = 0.1, {s0} = 1e-4, {s1} = 0.01, {s2} = 2\n"
                  "curvature empirical_fisher\nstructure kronecker every {s2}\n"
                  "iterate sum(init = {s0})\nlength gradient_norm\nmomentum heavy_ball(0.5)\n"
                  "decay l2({s1})\n", ("matrix",)),
    "secant": ("optimizer {name}\nhyper lr = 1, {s0} = 4, {s1} = 3\ncurvature secant\n"
               "structure low_rank\niterate secant(history = {s0}, iterations = {s1})\n"
               "length none\n", ("secant",)),
    "dense": ("optimizer {name}\nhyper lr = 0.5, {s0} = 0.1, {s1} = 0.9\ncurvature hessian\n"
              "structure dense\niterate ema({s1})\nlength none\ndamping inside({s0})\n",
              ("dense",)),
}
NEUTRAL = tuple(f"neutral{k}" for k in range(4))


def _slots(text: str) -> int:
    return sum(f"{{s{k}}}" in text for k in range(len(NEUTRAL)))


def _spec(key: str, names_: tuple[str, ...] = (), name: str = "Probe") -> str:
    text = PROBES[key][0]
    filled = list(names_) + list(NEUTRAL[len(names_):])
    return text.format(name=name, **{f"s{k}": filled[k] for k in range(len(NEUTRAL))})


def _module_identifiers(text: str) -> set[str]:
    return {t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type == tokenize.NAME and not keyword.iskeyword(t.string)}


@functools.lru_cache(maxsize=None)
def _vocabulary() -> tuple[str, ...]:
    """Every identifier of every shipped spec's module (all sections) and of the probes."""
    found: set[str] = set()
    for path in resources.shipped_specs().values():
        found |= _module_identifiers(curvc.to_module_source(path.read_text(), path.name, "auto"))
    for key in PROBES:
        found |= _module_identifiers(curvc.to_module_source(_spec(key), "probe.curv", "triton"))
    # 'lr' is every probe's own hyperparameter, the name every spec must use.
    return tuple(sorted(n for n in found - {"lr"} if "neutral" not in n))


VOCABULARY = _vocabulary()


def _refusal(text: str) -> CurvError | None:
    try:
        curvc.to_ir(text)
    except CurvError as e:
        return e
    return None


def _is_clear_refusal(e: CurvError) -> bool:
    return e.key in ("name.reserved_hyper", "name.reserved_optimizer") and "cannot name" in str(e)


# Names check refuses as a hyperparameter in some probe (each refusal is asserted
# to be a clear reserved-name message); the rest go into the sweep, four at a time.
_REFUSED = {n for n in VOCABULARY if any(_refusal(_spec(k, (n,))) for k in PROBES)}
_ACCEPTED = [n for n in VOCABULARY if n not in _REFUSED]
CHUNKS = [tuple(_ACCEPTED[i:i + 4]) for i in range(0, len(_ACCEPTED), 4)]


def _load(text: str, tmp_path, key: str):
    path = tmp_path / f"{key}.curv"
    path.write_text(text)
    return curvc.load(path, backend="triton")


def _params():
    return [torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.25])),
            torch.nn.Parameter(torch.tensor([[0.5, 2.0], [-1.0, 0.75]]))]


def _run(cls, path: str) -> list[list[float]]:
    """A few steps of one execution path from a fixed start; the parameters after."""
    if path == "update":  # the per-tensor torch rendering, as when no foreach section exists
        cls = type(cls.__name__, (cls,), {"foreach_update": None})
    params = _params()
    if path == "secant":
        opt = cls(params)

        def closure():
            opt.zero_grad()
            loss = sum(((p - 0.3) ** 2 * (i + 1)).sum() for i, p in enumerate(params))
            loss.backward()
            return loss
        for _ in range(2):
            opt.step(closure)
        return [p.detach().flatten().tolist() for p in params]
    opt = cls(params, fused=False if path in ("update", "foreach") else None)
    for k in range(3 if path != "triton" else 2):
        if path == "dense":
            opt.zero_grad()
            loss = sum(((p - 0.3) ** 4).sum() for p in params)
            loss.backward(create_graph=True)
        else:
            for i, p in enumerate(params):
                p.grad = torch.linspace(-1.0, 2.0, p.numel()).reshape(p.shape) * (k + 1 + i)
        opt.step()
    return [p.detach().flatten().tolist() for p in params]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    out = {}
    for key, (_, paths) in PROBES.items():
        cls = _load(_spec(key), tmp, key)
        out[key] = {path: _run(cls, path) for path in paths}
    return out


@pytest.mark.parametrize("name", sorted(_REFUSED))
def test_refused_identifiers_get_a_clear_message(name):
    for key in PROBES:
        e = _refusal(_spec(key, (name,)))
        assert e is None or _is_clear_refusal(e), str(e)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: "-".join(c))
def test_generated_identifiers_as_hyperparameters_change_nothing(chunk, reference, tmp_path):
    for key, (text, paths) in PROBES.items():
        n = _slots(text)
        groups = [chunk[i:i + n] for i in range(0, len(chunk), n)]
        while groups:
            group = groups.pop()
            e = _refusal(_spec(key, group))
            if e is not None:  # `x` as a tuple beside `x_0`: one at a time, then
                assert e.key == "name.tuple_entry_clash" and len(group) > 1, str(e)
                groups += [(name,) for name in group]
                continue
            cls = _load(_spec(key, group), tmp_path, key)
            for path in paths:
                assert _run(cls, path) == reference[key][path], (key, path, group)


@pytest.fixture(scope="module")
def read_globals():
    """Every name some generated module reads as a global: what a class could rebind."""
    out: set[str] = set()
    for key in PROBES:
        out |= _module_globals_read(curvc.to_module_source(_spec(key), "probe.curv", "triton"))
    return out


@pytest.mark.parametrize("name", VOCABULARY)
def test_generated_identifiers_as_the_optimizer_name_change_nothing(name, reference, tmp_path,
                                                                     read_globals):
    for key in ("elementwise", "kronecker"):
        text = _spec(key, name=name)
        e = _refusal(text)
        if e is not None:
            assert _is_clear_refusal(e), str(e)
            continue
        cls = _load(text, tmp_path, key)
        assert cls.__name__ == name
        # The class is bound last, as a module global: it can only change code that
        # reads that global, so the slow Triton interpreter runs just for such names.
        paths = [p for p in PROBES[key][1] if p != "triton" or name in read_globals]
        for path in paths:
            assert _run(cls, path) == reference[key][path], (key, path)


def test_the_vocabulary_is_the_generated_code():
    # The sweep must see the modules' real words: backend locals, module globals,
    # builtins the code calls, prefixed spec values.
    for must in ("torch", "math", "tl", "param", "grad", "h", "cdt", "pid", "mask", "offs",
                 "BLOCK", "CDT", "numels", "block_start", "matrix", "state", "float", "bool",
                 "h_lr", "f_maximize", "r_step_norm_sq", "CurvOptimizer", "t0"):
        assert must in VOCABULARY, must
    assert len(CHUNKS) * 4 >= len(VOCABULARY) - len(_REFUSED)


def test_names_of_the_backends_are_accepted_as_hyperparameters():
    """The point of prefixing: a spec may use the backends' own words."""
    for name in ("i", "pid", "mask", "offs", "BLOCK", "CDT", "numels", "block_start", "matrix",
                 "torch", "math", "tl", "float", "sum", "cdt", "h", "s2", "t0", "reduced_norm_sq",
                 "h_lr", "f_maximize", "update", "state", "defaults", "dict", "super"):
        assert _refusal(_spec("elementwise", (name,))) is None, name
        assert name not in _REFUSED, name


def test_only_the_api_is_refused():
    api = {n for n, _ in names.constructor_keywords("low_rank")} | {"params", "self", "step"}
    underscore = {n for n in VOCABULARY if n.startswith("_")}
    assert _REFUSED <= api | underscore, _REFUSED - api - underscore
    assert {"max_eval", "line_search_fn", "maximize", "fused", "params"} <= _REFUSED


def _module_globals_read(text: str) -> set[str]:
    """Names the module's code reads that no function of it defines (its globals)."""
    tree = ast.parse(text)
    local: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            args = node.args
            local |= {a.arg for a in args.args + args.kwonlyargs + args.posonlyargs}
        elif isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else local).add(node.id)
        elif isinstance(node, ast.comprehension):
            local |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
    return read - local


def test_module_level_names_are_private_or_declared():
    """A generated module defines only '_' names, the class, and the imports curvc.names
    declares; so the optimizer's name (a module global) can only clash with those."""
    for path in resources.shipped_specs().values():
        for backend in ("torch", "triton"):
            text = curvc.to_module_source(path.read_text(), path.name, backend)
            tree = ast.parse(text)
            cls = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
            defined = set(cls)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    defined |= {a.asname or a.name.split(".")[0] for a in node.names}
            for node in tree.body:
                targets = []
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    targets = [node.name]
                elif isinstance(node, ast.Assign):
                    targets = [n.id for t in node.targets for n in ast.walk(t)
                               if isinstance(n, ast.Name)]
                for name in targets:
                    assert name.startswith("_") or name in cls, (path.name, name)
            imports = defined - set(cls)
            assert {n for n in imports if not n.startswith("_")} <= set(names.MODULE_IMPORTS)
            public = {n for n in _module_globals_read(text) if not n.startswith("_")}
            assert public <= set(names.MODULE_IMPORTS) | set(dir(builtins)) | set(cls), \
                (path.name, public - set(names.MODULE_IMPORTS) - set(dir(builtins)))
