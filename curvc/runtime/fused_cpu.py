"""The fused CPU path: a rendered ``update`` compiled by inductor into one pass over memory.

``torch.compile`` turns the torch rendering of a plan (a chain of
elementwise ops over one tensor) into a single vectorised, OpenMP-parallel
C++ loop that loads each element once and stores it once, like
``torch.optim.Adam(fused=True)``'s hand-written kernel. Three details make
it fast and stable:

* One compilation per (dtypes, present buffers, flags): tensors are passed
  flattened with a dynamic length, and every host scalar travels in one
  1-D tensor ``s``, so a scheduler changing ``lr`` never recompiles.
* The compile sees large scratch tensors (inductor picks serial or parallel
  code from the size it sees first), never the user's state.
* Steps call inductor's compiled callable directly: dynamo's per-call
  frame and guard checks cost ~60-80 us per tensor, ~4x the call itself.
  Where the compiled graph writes its inputs in place (inductor keeps input
  mutations in the graph), even aot-autograd's runtime wrapper is skipped:
  the generated ``call`` is used once a run on scratch data has shown it
  writes exactly what the wrapped path writes. If the graph cannot be
  captured that way, calls go through dynamo.
* The host scalars live in one numpy-backed buffer, filled in place each
  step: building a tensor from a Python list costs ~10 us, the fill ~0.5 us.
"""
from __future__ import annotations

import types

import numpy as np
import torch

from curvc.runtime import vector_isa

_HINT = 1 << 20  # elements of the scratch tensors the kernel is compiled on


class FusedUpdate:
    """One compiled step for tensors of one (dtypes, present buffers, flags) layout.

    ``kernel(tensors, s, step)`` updates one parameter: ``tensors`` are the
    present tensors, flattened, ``s`` the host scalars and ``step`` the
    parameter's 0-d float32 step counter, which the compiled pass also
    increments (torch.optim keeps one per parameter; bumping them in a
    separate ``_foreach_add_`` costs more than the update of a small tensor).
    """

    def __init__(self, update, names: list[str], present: tuple[bool, ...],
                 scalar_names: list[str], flags: dict, dtypes: tuple, sdtype: torch.dtype,
                 counts_step: bool = True):
        self.names = [n for n, here in zip(names, present) if here]
        self.sdtype = sdtype
        n_scalars = len(scalar_names)
        flag_kw = dict(flags)

        def kernel(*args):
            it = iter(args[:-2])
            tensors = [next(it) if here else None for here in present]
            s, step = args[-2], args[-1]
            # positional, in the signature's order: scalars, reductions, flags
            update(*tensors, *(s[i] for i in range(n_scalars)), *flag_kw.values())
            if counts_step:  # the step's last kernel
                step.add_(1.0)

        captured = []

        def backend(gm, example_inputs):
            from torch._inductor.compile_fx import compile_fx
            compiled = compile_fx(gm, example_inputs)
            captured.append((list(example_inputs), compiled))
            return compiled

        # A code object of its own: dynamo keeps its compiled graphs per code object, up to
        # a recompile limit, and every kernel of every compiled optimizer would share this one.
        kernel = types.FunctionType(kernel.__code__.replace(), kernel.__globals__, "kernel",
                                    kernel.__defaults__, kernel.__closure__)
        self._via_dynamo = torch.compile(kernel, backend=backend, fullgraph=True, dynamic=False)
        scratch = [torch.ones(_HINT, dtype=dt) for dt in dtypes]
        for t in scratch:
            torch._dynamo.mark_dynamic(t, 0)
        s = torch.zeros(max(n_scalars, 1), dtype=sdtype)
        step = torch.zeros((), dtype=torch.float32)
        # Inductor's ISA probe once per machine, not per process; no size and stride
        # asserts in the generated call (2 us a tensor): _fused_step passes only plain
        # contiguous CPU tensors of the row's dtypes, flattened, of one length.
        from torch._inductor import config as inductor_config
        with vector_isa.probed(), inductor_config.patch(size_asserts=False):
            self._via_dynamo(*scratch, s, step)
        self._direct = self._raw = None
        if len(captured) == 1:
            inputs, compiled = captured[0]
            order = []
            for e in inputs:
                if isinstance(e, torch.Tensor):
                    idx = [i for i, t in enumerate(scratch) if t is e]
                    order.append(("s",) if e is s else ("c",) if e is step else
                                 ("t", idx[0]) if len(idx) == 1 else None)
                elif isinstance(e, (int, torch.SymInt)):
                    order.append(("n",))
                else:
                    order.append(None)
            if None not in order:
                self._direct, self._order = compiled, order
                self._raw = _verified_raw_call(compiled, order, dtypes, n_scalars, sdtype)
        # The step's scalars: a numpy buffer and a tensor sharing its memory.
        self._np = np.zeros(max(n_scalars, 1), dtype=torch.empty((), dtype=sdtype).numpy().dtype)
        self.scalars = torch.from_numpy(self._np)

    def set_scalars(self, values: list[float]) -> torch.Tensor:
        """Write this step's host scalars into the shared buffer; returns it as ``s``."""
        self._np[:len(values)] = values
        return self.scalars

    def __call__(self, tensors: list[torch.Tensor], s: torch.Tensor, step: torch.Tensor) -> None:
        """One parameter's step (see the class docstring)."""
        if self._direct is None:
            self._via_dynamo(*tensors, s, step)
            return
        args = _arguments(self._order, tensors, s, step)
        if self._raw is not None:
            self._raw(args)  # consumes the list
        else:
            self._direct(*args)


def _arguments(order, tensors, s, step) -> list:
    """The compiled graph's inputs in its own order."""
    n = tensors[0].shape[0]
    return [s if o[0] == "s" else step if o[0] == "c" else n if o[0] == "n" else tensors[o[1]]
            for o in order]


def _verified_raw_call(compiled, order, dtypes, n_scalars, sdtype):
    """Inductor's generated ``call(args)`` under aot-autograd's wrapper, if running it
    alone writes the same as running the wrapper (input mutations kept in the graph);
    else None. Checked once, on scratch tensors of an awkward length."""
    raw = getattr(compiled, "current_callable", None)
    if raw is None:
        return None
    g = torch.Generator().manual_seed(0)
    n = 1031
    base = [(torch.rand(n, generator=g) + 0.5).to(dt) for dt in dtypes]
    base.append(torch.tensor(3.0))
    s = (torch.rand(max(n_scalars, 1), generator=g) * 0.5 + 0.25).to(sdtype)

    def run(fn, boxed):
        ts = [t.clone() for t in base]
        args = _arguments(order, ts[:-1], s.clone(), ts[-1])
        fn(args) if boxed else fn(*args)
        return ts
    try:
        wrapped, alone = run(compiled, False), run(raw, True)
    except Exception:
        return None
    same = all(torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
               for a, b in zip(wrapped, alone))
    changed = all(not torch.equal(a, b) for a, b in zip(wrapped[:1] + wrapped[-1:],
                                                        base[:1] + base[-1:]))
    return raw if same and changed else None
