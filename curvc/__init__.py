"""curvc: optimizers as points in the approximated-curvature space, compiled.

A spec (``specs/adam.curv``) names a point of Table 1 of "A Unified View of
Optimizers from an Approximated Curvature Perspective" (which curvature is
estimated, what structure it gets, how it is iterated, how the step length
is limited); curvc checks it, lowers it to a fused elementwise plan, and
emits a ``torch.optim.Optimizer`` subclass::

    import curvc
    Adam = curvc.load("adam")                 # a shipped spec, by name
    Mine = curvc.load("path/to/mine.curv")    # or any spec file
"""
from curvc.compiler import (available, compile_file, load, resolve, to_ir, to_module_source,
                            to_plan)
from curvc.errors import CurvError
from curvc.groups import param_groups
from curvc.version import __version__

__all__ = ["CurvError", "available", "compile_file", "load", "param_groups", "resolve", "to_ir", "to_module_source",
           "to_plan", "__version__"]
