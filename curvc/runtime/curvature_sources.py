"""Where a step's curvature comes from: the part of ``CurvOptimizer`` that asks the
registry of curvature sources (``curvc.runtime.estimators``) for what to compute, and
hands it to the step: per-parameter estimates, layer hooks' preconditioned gradients,
or a model-wide matrix.

A mixin of ``CurvOptimizer`` (curvc/runtime/optimizer.py), which holds the torch.optim
bookkeeping; the plan's elementwise step runs in ``elementwise_step``. What each
method needs from a generated class is its program's ``source`` and ``host``.
"""
from __future__ import annotations

import weakref

import torch

from curvc.runtime import amp, estimators, zero
from curvc.runtime.program import resolved

_MODEL_KEY = "model"  # where _estimates keeps a model-wide matrix


class CurvatureSources:
    """The curvature estimate of the next step: asked for, computed, handed over, released.

    Which source a class has, and what it needs, comes from ``estimators.source_of``;
    every branch below reads a property of that entry, never a curvature's name.
    """

    @classmethod
    def curvature_source(cls) -> estimators.Source | None:
        """Where this class's curvature comes from: its entry of
        ``curvc.runtime.estimators`` (what it needs from the training loop, e.g.
        ``needs_closure``; ``whole_model`` for a step over all parameters as one vector),
        or None for a step from the gradient alone."""
        return estimators.source_of(cls)

    def _source(self) -> estimators.Source | None:
        return estimators.source_of(type(self))

    def _source_args(self, host: tuple | None = None) -> dict:
        """The source's arguments for this step's hyperparameters (the plan's estimator
        arguments, or the dense settings); ``host``: this step's (scalars, flags), if the
        caller has them already."""
        h = self._flat_hypers(self.param_groups[0])
        # an argument may be a host value of the step (power_ema's beta_t, a bias correction)
        scalars = (host or self.host(resolved(h), self._next_step()))[0]
        return self.PROGRAM.source.args({**h, **scalars})

    def track(self, model: torch.nn.Module) -> None:
        """Hook ``model``'s layers so that a layer-statistics source (K-FAC) sees their
        inputs and output gradients.

        Called by the constructor when it is given the model itself
        (``Opt(model, lr=...)``); call it after ``load_state_dict`` on a new model.
        """
        source = self._source()
        if source is None or not source.hooks_layers:
            raise RuntimeError(estimators.NO_LAYERS.format(name=type(self).__name__))
        # Weakly: the model's hooks must not keep this optimizer alive. Built before the
        # old hooks go, so that a refused model leaves the optimizer as it was.
        tracker = source.tracker(model, weakref.WeakMethod(self._layers_accumulate),
                                 [p for g in self.param_groups for p in g["params"]])
        if self._tracker is not None:
            self._tracker.remove()
        self._tracker = tracker

    def _layers_accumulate(self) -> bool:
        """Whether the next step accumulates layer statistics (asked by the tracker)."""
        return self._source().records(self)

    def close(self) -> None:
        """Remove the hooks this optimizer put on the model (its layer tracker).

        They also go when the optimizer is garbage-collected; ``close()`` (or a
        ``with`` block) removes them now. An optimizer that hooks layers needs
        ``track(model)`` before it steps again. A no-op for optimizers without hooks.
        """
        tracker, self._tracker = getattr(self, "_tracker", None), None
        if tracker is not None:
            tracker.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _next_step(self) -> float:
        for group in self.param_groups:
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    return float(self.state[p]["step"]) + 1.0
        return 1.0

    def _refreshes(self, step: float) -> bool:
        """Whether the source is refreshed on ``step`` (its plan flag; every step without)."""
        node = self.PROGRAM.source  # a dense matrix refreshes on its settings' flag
        flag = node.when if node.scope != estimators.MODEL else self._source_args()["refresh"]
        h = self._flat_hypers(self.param_groups[0])
        return flag is None or bool(self.host(resolved(h), step)[1][flag])

    def wants_curvature(self) -> bool:
        """Whether the next ``step()`` refreshes the curvature estimate.

        On those steps the optimizer needs what its estimator needs: gradients
        with a graph (``loss.backward(create_graph=True)``) for a Hessian source, or
        ``estimate_curvature(logits=...)`` for one built from the model's logits.
        """
        source = self._source()
        if source is None or not source.asks_training_loop:
            return False  # layer hooks, the gradient or a closure: nothing from the loop
        return self._refreshes(self._next_step())

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _estimated(self) -> list[torch.Tensor]:
        """The tensors whose curvature this rank estimates: its trainable ones; as
        ZeroRedundancyOptimizer's local optimizer averaging over the ranks, every rank's
        (each rank's data must enter the average of every tensor: ``_averaged`` then
        keeps this rank's own)."""
        everyone = zero.all_params(self) if self._curvature_group() is not None else None
        if everyone is None:
            return self._trainable()
        return [p for p in everyone if p.requires_grad]

    def estimate_curvature(self, logits: torch.Tensor | None = None,
                           loss: torch.Tensor | None = None) -> None:
        """Compute this step's curvature estimate now; ``step()`` then uses it.

        A source built from the model's outputs (a Fisher) takes their ``logits`` on the
        batch, before ``loss.backward()`` frees their graph. A Hessian source
        (Hutchinson's, the exact diagonal, the dense matrix) takes the ``loss`` (it
        differentiates twice itself, so no ``create_graph`` is needed on ``backward``).
        """
        source = self._source()
        if source is None:
            raise RuntimeError(estimators.NOTHING_TO_REQUEST.format(name=type(self).__name__))
        if not source.estimated_on_request:
            raise source.request_error(source.message(source.request, self))
        args = self._source_args()
        params = self.param_groups[0]["params"] if source.whole_model else self._estimated()
        with torch.enable_grad():
            if source.needs_logits and logits is not None:
                est = source.compute(params, logits, args)
            elif source.takes_loss and loss is not None:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                # A parameter the loss does not reach (None) has a zero Hessian row too.
                est = source.compute(params, grads, args, True)  # the user's backward follows
            else:
                raise source.request_error(source.message(source.request, self))
        self._estimates = self._averaged(self._keyed(source, params, est))

    @staticmethod
    def _keyed(source: estimators.Source, params: list, est) -> dict:
        """An estimate as ``_estimates`` holds it: per parameter, or one for the model."""
        if source.whole_model:
            return {_MODEL_KEY: est.detach()}
        return {p: e.detach() for p, e in zip(params, est)}

    def set_curvature(self, estimates) -> None:
        """Hand ``step()`` this step's curvature estimate: one tensor per parameter, in
        ``param_groups`` order (None for parameters without one); for a model-scope
        source (the dense structure), one n x n matrix over all parameters."""
        params = [p for g in self.param_groups for p in g["params"]]
        source = self._source()
        if source is not None and source.whole_model:
            matrix = torch.as_tensor(estimates)
            n = sum(p.numel() for p in params)
            if matrix.shape != (n, n):
                raise ValueError(f"step(curvature=...) of {type(self).__name__} takes one "
                                 f"{n} x {n} matrix, got shape {tuple(matrix.shape)}")
            self._estimates = {_MODEL_KEY: matrix}
            return
        estimates = list(estimates)
        if len(estimates) != len(params):
            raise ValueError(f"set_curvature() got {len(estimates)} tensors for "
                             f"{len(params)} parameters")
        for p, e in zip(params, estimates):
            if e is not None and e.shape != p.shape:
                raise ValueError(f"a curvature estimate of shape {tuple(e.shape)} for a "
                                 f"parameter of shape {tuple(p.shape)}")
        self._estimates = {p: e.detach() for p, e in zip(params, estimates) if e is not None}

    def _estimate_before_step(self, guard: amp.StepGuard, curvature) -> tuple:
        """This step's estimate, before any state changes: from the layer hooks (returns
        the statistics updates to commit once the step is accepted), from gradients
        with a graph, or as handed over; refuses a refresh step without one."""
        source = self._source()
        if source is None:
            return ()
        if source.whole_model:
            return self._model_estimates(source, guard)
        if source.hooks_layers and curvature is None:
            return source.compute(self, guard)
        if not source.hooks_layers and not self._estimates and self.wants_curvature():
            if source.needs_graph:
                self._estimate_from_graph(source, guard)
            if not self._estimates:
                raise RuntimeError(source.message(source.missing, self))
        return ()

    def _missing_input(self) -> str:
        """What step() says when a refresh step's estimate of a parameter is missing."""
        return self._source().message(self._source().missing, self)

    def _model_estimates(self, source: estimators.Source, guard: amp.StepGuard) -> tuple:
        """A model-scope source (the dense structure): this step's n x n matrix,
        accumulated, and every parameter's preconditioned gradient into ``_estimates``
        for the elementwise rest of the step; returns the accumulated matrix to commit
        once the step is accepted."""
        from curvc.runtime import dense
        params = self.param_groups[0]["params"]
        if all(p.grad is None for p in params):
            self._estimates = {}
            return ()  # torch.optim's rule: no gradients, no step
        for p in params:
            if p.grad is not None:
                self._check_grad(p, p.grad)
        settings = self._source_args()
        prev = self.state.get(params[0], {}).get("curvature")  # .get: no empty state made
        refresh = self._refreshes(self._next_step())
        matrix = self._model_matrix(source, params, guard) if refresh else None
        guard.check([("the curvature matrix", "value", matrix)])
        if guard.skips_on_host():  # the matrix stays as it was
            self._estimates = {}
            return ()
        acc = dense.accumulate(prev, matrix, settings) if refresh else prev
        if acc is None:  # a delayed refresh: before the first, the zero (or init I) start
            acc = dense.start(sum(p.numel() for p in params), params[0], settings)
        d = dense.gradient_direction(acc, params, settings)
        self._estimates = dense.preconditioned(params, d)
        return ((params[0], "curvature", acc),)

    def _model_matrix(self, source: estimators.Source, params: list, guard: amp.StepGuard):
        """This refresh's matrix: handed over (``step(curvature=...)``, or
        ``estimate_curvature``), built from the gradient, or computed from gradients
        with a graph."""
        matrix = self._estimates.get(_MODEL_KEY)
        if matrix is None and not source.asks_training_loop:
            return source.compute(params, self._source_args())
        if matrix is None and source.needs_graph and any(
                p.grad is not None and p.grad.grad_fn is not None for p in params):
            with torch.enable_grad():  # constant gradients: zero rows
                matrix = source.compute(params, [p.grad for p in params],
                                        self._source_args(), False).detach()
            matrix, = guard.unscale_from_graph([matrix])  # rows of a scaled gradient
        if matrix is None:
            raise RuntimeError(source.message(source.missing, self))
        return matrix

    def _decided_on_host(self, curvature) -> bool:
        """Whether this step's source keeps state outside the plan (layer statistics,
        a model's matrix), so that a non-finite step is decided, and skipped, on the
        host before that state is built."""
        source = self._source()
        return source is not None and (source.whole_model or
                                       (source.hooks_layers and curvature is None))

    def _curvature_group(self):
        """The ranks this optimizer's estimates are averaged over (curvc.runtime.distributed)."""
        from curvc.runtime import distributed
        return distributed.group_of(getattr(self, "_group_choice", None))

    def _averaged(self, estimates: dict) -> dict:
        """Local estimates, averaged over the ranks holding a replica (one bucketed
        all-reduce); as they are without torch.distributed."""
        group = self._curvature_group()
        if group is None:
            return estimates
        source = self._source()
        if source is not None and source.yields == estimators.ROWS:
            # the mean of the ranks' Gram matrices is not the Gram of their mean rows
            raise RuntimeError(f"{type(self).__name__}: Kronecker factors from sampled "
                               "gradients are not averaged over data-parallel replicas yet; "
                               "pass curvature_group=False to keep each rank's own")
        from curvc.runtime import distributed
        keys = list(estimates)
        averaged = dict(zip(keys, distributed.average([estimates[k] for k in keys], group)))
        if zero.all_params(self) is not None:  # ZeRO: of every rank's tensors, this one's own
            own = {id(p) for p in self._trainable()}
            averaged = {p: e for p, e in averaged.items() if id(p) in own}
        return averaged

    def _estimate_from_graph(self, source: estimators.Source, guard: amp.StepGuard) -> None:
        """The estimate from gradients that carry their graph (backward(create_graph=True))."""
        pairs = [(p, p.grad) for p in self._estimated() if p.grad is not None]
        if all(g.grad_fn is None for _, g in pairs):
            return  # no graph at all: backward() ran without create_graph
        with torch.enable_grad():
            est = source.compute([p for p, _ in pairs], [g for _, g in pairs],
                                 self._source_args(), False)
        est = guard.unscale_from_graph([e.detach() for e in est])  # H of a scaled loss
        self._estimates = self._averaged({p: e for (p, _), e in zip(pairs, est)})

    def _release_graphs(self) -> None:
        """Drop gradients' graphs after use: p.grad -> graph -> p is a reference cycle
        that would keep every step's graph alive."""
        for p in self._estimated():
            if p.grad is not None and p.grad.grad_fn is not None:
                p.grad = p.grad.detach()
