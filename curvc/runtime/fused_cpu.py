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
  If the graph cannot be captured that way, calls go through dynamo.
"""
from __future__ import annotations

import torch

_HINT = 1 << 20  # elements of the scratch tensors the kernel is compiled on


class FusedUpdate:
    def __init__(self, update, names: list[str], present: tuple[bool, ...],
                 scalar_names: list[str], flags: dict, dtypes: tuple, sdtype: torch.dtype):
        self.names = [n for n, here in zip(names, present) if here]
        self.sdtype = sdtype
        n_scalars = len(scalar_names)
        flag_kw = dict(flags)

        def kernel(*args):
            it = iter(args[:-1])
            tensors = [next(it) if here else None for here in present]
            s = args[-1]
            update(*tensors, **{n: s[i] for i, n in enumerate(scalar_names)}, **flag_kw)

        captured = []

        def backend(gm, example_inputs):
            from torch._inductor.compile_fx import compile_fx
            compiled = compile_fx(gm, example_inputs)
            captured.append((list(example_inputs), compiled))
            return compiled

        self._via_dynamo = torch.compile(kernel, backend=backend, fullgraph=True, dynamic=False)
        scratch = [torch.ones(_HINT, dtype=dt) for dt in dtypes]
        for t in scratch:
            torch._dynamo.mark_dynamic(t, 0)
        s = torch.zeros(max(n_scalars, 1), dtype=sdtype)
        self._via_dynamo(*scratch, s)
        self._direct = None
        if len(captured) == 1:
            inputs, compiled = captured[0]
            order = []
            for e in inputs:
                if isinstance(e, torch.Tensor):
                    idx = [i for i, t in enumerate(scratch) if t is e]
                    order.append(("s",) if e is s else ("t", idx[0]) if len(idx) == 1 else None)
                elif isinstance(e, (int, torch.SymInt)):
                    order.append(("n",))
                else:
                    order.append(None)
            if None not in order:
                self._direct, self._order = compiled, order

    def __call__(self, tensors: list[torch.Tensor], s: torch.Tensor) -> None:
        """One parameter's step; ``tensors`` are the present tensors, flattened."""
        if self._direct is None:
            self._via_dynamo(*tensors, s)
            return
        n = tensors[0].shape[0]
        args = [s if o[0] == "s" else n if o[0] == "n" else tensors[o[1]] for o in self._order]
        self._direct(*args)
