"""Backends render a lowered ``Plan`` as source code; they know no optimizer by name.

* ``render``: the shared pieces: scheduling an expression DAG into guarded
  statements, an indented string builder, the base renderer with its
  operator table.
* ``torch``: plain PyTorch source, the CPU path (eager, or one fused pass via
  ``torch.compile``).
* ``triton``: ``@triton.jit`` multi-tensor kernels for CUDA.
"""

BACKENDS = ("torch", "triton", "auto")
