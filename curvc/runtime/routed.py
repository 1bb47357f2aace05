"""``RoutedOptimizer``: one torch optimizer over several compiled pipelines.

A routed spec's class (``curvc.routing``) lists its pipelines (each a compiled class
and how its hyperparameters come from the routed class's) and its routes (a test of a
parameter's ndim, numel, shape and param group). The routed optimizer owns the param
groups and the state users see; each pipeline runs as an optimizer of the compiled
class over the parameters routed to it, one group per routed group that has some, and
shares the routed optimizer's ``state`` dict, so every parameter's state is under its
pipeline's own names (a Muon parameter's ``momentum_buffer``, an AdamW parameter's
``exp_avg``). Nothing here knows what a pipeline computes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from curvc.cache import PicklesByModuleText
from curvc.names import CONSTRUCTOR_KEYWORDS
from curvc.runtime import amp


class Pipeline(NamedTuple):
    name: str
    cls: type
    hypers: tuple  # (its hyperparameter, the routed one, index or None)
    fixed: tuple  # (its hyperparameter, a value written in the routed spec)


class Route(NamedTuple):
    pipeline: int  # index into PIPELINES
    test: Callable | None  # (ndim, numel, shape, group) -> bool; None: otherwise
    text: str  # the rule as the spec writes it


# Keywords that go to every pipeline's groups as they are (curvature_group: to its
# constructor, as CurvOptimizer keeps it off the groups).
_SHARED = tuple(n for n, _ in CONSTRUCTOR_KEYWORDS if n != "curvature_group")


def pipeline_class(source: str, file: str, backend: str) -> type:
    """A pipeline's compiled class, from its spec text (the compiler's cache)."""
    from curvc import compiler
    return compiler._load_cached(source, file, backend)


class RoutedOptimizer(PicklesByModuleText, torch.optim.Optimizer):
    """Base of every routed spec's class. Not used directly."""

    HYPERS: tuple = ()  # (name, default)
    PIPELINES: tuple = ()  # Pipeline
    ROUTES: tuple = ()  # Route
    # The ranks the skip decision is made over (CurvOptimizer.nonfinite_group); the
    # pipelines decide nothing more across ranks: the routed step decided for all of them.
    nonfinite_group = None

    def _construct(self, params, defaults: dict) -> None:
        RoutedOptimizer.__init__(self, params, defaults)

    def __init__(self, params, defaults: dict):
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        self._group_choice = defaults.pop("curvature_group", None)
        super().__init__(params, defaults)
        self._layout = None
        self._children: list = []
        self._pipelines()  # route now: a parameter no route takes is refused here

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if "_layout" in self.__dict__:  # after construction: route the new group now
            try:
                self._pipelines()
            except ValueError:
                self.param_groups.pop()  # refused: the optimizer stays as it was
                self._layout = None
                raise

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_group_choice", None)
        self._layout, self._children = None, []

    # -- routing -------------------------------------------------------------------

    def route(self, p: torch.Tensor, group: dict, where: str = "a parameter") -> str:
        """The name of the pipeline that takes ``p`` in ``group``."""
        return self.PIPELINES[self._route(p, group, where)].name

    def _route(self, p, group: dict, where: str) -> int:
        shape = tuple(p.shape)
        hits = [r for r in self.ROUTES
                if r.test is not None and r.test(len(shape), p.numel(), shape, group)]
        if len(hits) > 1:
            raise ValueError(f"{type(self).__name__}: {where} (shape {shape}) is taken by "
                             f"two routes: `{hits[0].text}` and `{hits[1].text}`")
        if not hits:
            hits = [r for r in self.ROUTES if r.test is None]
        if not hits:
            rules = "; ".join(f"{self.PIPELINES[r.pipeline].name} when `{r.text}`"
                              for r in self.ROUTES)
            raise ValueError(f"{type(self).__name__}: no route takes {where} (shape {shape}, "
                             f"ndim {len(shape)}); the routes: {rules}")
        return hits[0].pipeline

    def _mapped(self, pipe: Pipeline, group: dict) -> dict:
        out = {mine: group[theirs] if index is None else group[theirs][index]
               for mine, theirs, index in pipe.hypers}
        out.update(pipe.fixed)
        out.update((k, group[k]) for k in _SHARED if k in group)
        return out

    def _pipelines(self) -> list:
        """(optimizer, pipeline, indices of the routed groups it has) per pipeline with
        parameters; rebuilt when the groups' parameters change (``add_param_group``)."""
        layout = tuple(tuple(map(id, g["params"])) for g in self.param_groups)
        if layout != self._layout:
            taken: list[list[list]] = [[[] for _ in self.param_groups] for _ in self.PIPELINES]
            for gi, group in enumerate(self.param_groups):
                for pi, p in enumerate(group["params"]):
                    k = self._route(p, group, f"param_groups[{gi}]['params'][{pi}]")
                    taken[k][gi].append(p)
            children = []
            for pipe, per_group in zip(self.PIPELINES, taken):
                index = [gi for gi, ps in enumerate(per_group) if ps]
                if not index:
                    continue
                groups = [{**self._mapped(pipe, self.param_groups[gi]), "params": per_group[gi]}
                          for gi in index]
                opt = pipe.cls(groups, **self._mapped(pipe, self.defaults),
                               curvature_group=self._group_choice)
                children.append((opt, pipe, index))
            self._children, self._layout = children, layout
        for opt, pipe, index in self._children:  # a scheduler may have moved a value
            # decided for every rank by the routed step; under ZeRO another rank may hold
            # other pipelines, which a per-pipeline all-reduce would leave waiting
            opt.nonfinite_group = False
            for child_group, gi in zip(opt.param_groups, index):
                child_group.update(self._mapped(pipe, self.param_groups[gi]))
            opt.state = self.state  # one state: load_state_dict rebinds it
        return self._children

    # -- the step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, *, curvature=None):
        """Performs a single optimization step: each pipeline's, in the spec's order.
        ``curvature`` (optional): this step's estimates, as ``set_curvature`` takes them."""
        if curvature is not None:
            self.set_curvature(curvature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        children = self._pipelines()
        # nonfinite='skip' or 'raise' decides for the whole step, before any pipeline runs
        # (a host read): a NaN in one pipeline's gradient leaves the others' too.
        guard = amp.StepGuard(self)
        guard.unscale_grads()  # raise mode raises here, naming the routed position
        if guard.active and guard.skips_on_host():
            guard.count_skip([p for g in self.param_groups for p in g["params"]])
            return loss
        for opt, _, _ in children:
            opt.step()
        return loss

    def wants_curvature(self) -> bool:
        return any(opt.wants_curvature() for opt, _, _ in self._pipelines())

    def estimate_curvature(self, *args, **kwargs) -> None:
        for opt, _, _ in self._pipelines():
            if opt.wants_curvature():
                opt.estimate_curvature(*args, **kwargs)

    def set_curvature(self, estimates) -> None:
        """Hand the next ``step()`` its curvature estimates: one tensor per parameter, in
        this optimizer's ``param_groups`` order (None where a parameter has none); each
        pipeline gets its own parameters' estimates, in its order."""
        params = [p for g in self.param_groups for p in g["params"]]
        estimates = list(estimates)
        if len(estimates) != len(params):
            raise ValueError(f"set_curvature() got {len(estimates)} tensors for "
                             f"{len(params)} parameters")
        by_param = {id(p): e for p, e in zip(params, estimates)}
        children = self._pipelines()
        for opt, pipe, _ in children:  # checked first: a refusal hands nothing over
            source = opt._source()
            if source is not None and source.whole_model:
                raise ValueError(f"{type(self).__name__}.set_curvature: pipeline "
                                 f"{pipe.name!r} takes one matrix over all of its "
                                 "parameters; call its own set_curvature")
        for opt, _, _ in children:
            mine = [by_param[id(p)] for g in opt.param_groups for p in g["params"]]
            if any(e is not None for e in mine):
                opt.set_curvature(mine)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state keeps the dtype it was saved with and every step counter
        is a float32 CPU scalar, as each pipeline's optimizer keeps them."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    self.state[p][key] = torch.tensor(float(value), dtype=torch.float32)
                elif self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)
