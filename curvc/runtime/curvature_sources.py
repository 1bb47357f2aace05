"""Where a step's curvature comes from: the part of ``CurvOptimizer`` that talks to the
estimators of ``curvc.runtime.curvature``, K-FAC's layer hooks and the dense matrix.

A mixin of ``CurvOptimizer`` (curvc/runtime/optimizer.py), which holds the torch.optim
bookkeeping; the plan's elementwise step runs in ``elementwise_step``. What each
method needs from a generated class is its ``ESTIMATOR``, ``dense`` and ``host``.
"""
from __future__ import annotations

import weakref

import torch

from curvc.runtime import amp


class CurvatureSources:
    """The curvature estimate of the next step: asked for, computed, handed over, released."""

    @classmethod
    def _estimator_kind(cls) -> str | None:
        return cls.ESTIMATOR[0] if cls.ESTIMATOR is not None else None

    def track(self, model: torch.nn.Module) -> None:
        """Hook ``model``'s layers so that K-FAC sees their inputs and output gradients.

        Called by the constructor when it is given the model itself
        (``KFAC(model, lr=...)``); call it after ``load_state_dict`` on a new model.
        """
        if self._estimator_kind() != "kfac":
            raise RuntimeError(f"{type(self).__name__} does not track layers; track() is for "
                               "K-FAC optimizers")
        from curvc.runtime.kfac import LayerTracker
        if self._tracker is not None:
            self._tracker.remove()
        # Weakly: the model's hooks must not keep this optimizer alive.
        self._tracker = LayerTracker(model, wanted=weakref.WeakMethod(self._kfac_accumulates))

    def _kfac_accumulates(self) -> bool:
        """Whether the next step accumulates K-FAC statistics (asked by the tracker)."""
        h = self._flat_hypers(self.param_groups[0])
        flag = self.ESTIMATOR[3](h)["accumulate"]
        return flag is None or bool(self.host(h, self._next_step())[1][flag])

    def close(self) -> None:
        """Remove the hooks this optimizer put on the model (K-FAC's layer tracker).

        They also go when the optimizer is garbage-collected; ``close()`` (or a
        ``with`` block) removes them now. A K-FAC optimizer needs ``track(model)``
        before it steps again. A no-op for optimizers without hooks.
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

    def wants_curvature(self) -> bool:
        """Whether the next ``step()`` refreshes the curvature estimate.

        On those steps the optimizer needs what its estimator needs: gradients
        with a graph (``loss.backward(create_graph=True)``) for Hutchinson, or
        ``estimate_curvature(logits=...)`` for Gauss-Newton-Bartlett.
        """
        if self.dense is not None:
            settings = self.dense(self._flat_hypers(self.param_groups[0]))
            return settings["curvature"] != "empirical_fisher" and \
                self._dense_refresh(self._next_step(), settings)
        if self.ESTIMATOR is None or self._estimator_kind() == "kfac":
            return False  # K-FAC's hooks need nothing from the training loop
        when = self.ESTIMATOR[2]
        if when is None:
            return True
        flags = self.host(self._flat_hypers(self.param_groups[0]), self._next_step())[1]
        return bool(flags[when])

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def estimate_curvature(self, logits: torch.Tensor | None = None,
                           loss: torch.Tensor | None = None) -> None:
        """Compute this step's curvature estimate now; ``step()`` then uses it.

        Gauss-Newton-Bartlett (Sophia-G) takes the model's ``logits`` on the
        batch, before ``loss.backward()`` frees their graph. Hutchinson
        (AdaHessian, Sophia-H) takes the ``loss`` (it differentiates twice
        itself, so no ``create_graph`` is needed on ``backward``).
        """
        from curvc.runtime import curvature
        if self.dense is not None:
            self._estimate_dense(logits, loss)
            return
        if self.ESTIMATOR is None:
            raise RuntimeError(f"{type(self).__name__} estimates no curvature; "
                               "estimate_curvature() is for optimizers with an estimator")
        kind, _, _, make_args = self.ESTIMATOR
        if kind == "kfac":
            raise RuntimeError(f"{type(self).__name__} gathers its statistics through hooks on "
                               "the model's layers: pass the model to the constructor or call "
                               "opt.track(model) once; estimate_curvature() is not needed")
        args = make_args(self._flat_hypers(self.param_groups[0]))
        params = self._trainable()
        with torch.enable_grad():
            if kind in ("gauss_newton_bartlett", "fisher"):
                if logits is None:
                    raise TypeError(self._missing_estimate_message(kind))
                est = curvature.ESTIMATORS[kind](params, logits, int(args["samples"]))
            else:
                if loss is None:
                    raise TypeError(f"{type(self).__name__}.estimate_curvature(loss=...) needs "
                                    "the loss whose Hessian diagonal it estimates")
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                # A parameter the loss does not reach (None) has a zero Hessian row too.
                est = curvature.hutchinson(params, list(grads), int(args["samples"]),
                                           args["distribution"],
                                           bool(args.get("spatial_average", False)),
                                           keep_graph=True)  # the user's backward follows
        self._estimates = self._averaged({p: e.detach() for p, e in zip(params, est)})

    def set_curvature(self, estimates) -> None:
        """Hand ``step()`` this step's curvature estimate: one tensor per parameter, in
        ``param_groups`` order (None for parameters without one)."""
        params = [p for g in self.param_groups for p in g["params"]]
        estimates = list(estimates)
        if len(estimates) != len(params):
            raise ValueError(f"set_curvature() got {len(estimates)} tensors for "
                             f"{len(params)} parameters")
        for p, e in zip(params, estimates):
            if e is not None and e.shape != p.shape:
                raise ValueError(f"a curvature estimate of shape {tuple(e.shape)} for a "
                                 f"parameter of shape {tuple(p.shape)}")
        self._estimates = {p: e.detach() for p, e in zip(params, estimates) if e is not None}

    def _dense_refresh(self, step: float, settings: dict) -> bool:
        flag = settings["refresh"]
        return flag is None or self.host(self._flat_hypers(self.param_groups[0]), step)[1][flag]

    def _dense_step(self, closure, curvature):
        from curvc.runtime import dense
        loss = None
        guard = amp.StepGuard(self)
        if closure is not None:
            if guard.scaled:
                raise RuntimeError("a closure re-evaluates the gradients after GradScaler "
                                   "checked them: call scaler.step(opt) without one")
            with torch.enable_grad():
                loss = closure()
        params = self.param_groups[0]["params"]
        if all(p.grad is None for p in params):
            self._release_graphs()  # torch.optim's rule: no gradients, no step
            self._estimates = {}
            return loss
        try:
            guard.unscale_grads()  # before g g^T; raise mode: a non-finite gradient stops here
            for p in params:
                if p.grad is not None:
                    self._check_grad(p, p.grad)
            settings = self.dense(self._flat_hypers(self.param_groups[0]))
            refresh = self._dense_refresh(self._next_step(), settings)
            matrix = None
            if curvature is not None:
                matrix = torch.as_tensor(curvature)
                n = sum(p.numel() for p in params)
                if matrix.shape != (n, n):
                    raise ValueError(f"step(curvature=...) of {type(self).__name__} takes one "
                                     f"{n} x {n} matrix, got shape {tuple(matrix.shape)}")
            elif refresh and settings["curvature"] == "empirical_fisher":
                g = dense.flat_grad(params).detach()
                matrix = torch.outer(g, g)
            elif refresh:
                matrix = self._estimates.get("dense")
                if matrix is None and settings["curvature"] == "fisher":
                    raise RuntimeError(self._missing_estimate_message("fisher"))
                if matrix is None and any(p.grad is not None and p.grad.grad_fn is not None
                                          for p in params):  # constant ones: zero rows
                    with torch.enable_grad():
                        matrix = dense.hessian(params, [p.grad for p in params]).detach()
                    matrix, = guard.unscale_from_graph([matrix])  # rows of a scaled gradient
                if matrix is None:
                    raise RuntimeError(
                        f"{type(self).__name__} needs the Hessian on this step: call "
                        "loss.backward(create_graph=opt.wants_curvature()) before step(), or "
                        "opt.estimate_curvature(loss=loss), or pass step(curvature=H)")
            guard.check([("the curvature matrix", "value", matrix)])
        finally:
            self._release_graphs()
            self._estimates = {}
        if guard.skips_on_host():  # the matrix and the counters stay as they were
            for p in params:
                if p.grad is not None:
                    p.grad = p.grad.detach()
            guard.count_skip(params)
            return loss
        for p in params:
            if p.grad is not None:
                p.grad = p.grad.detach()
        dense.step(self, settings, refresh, matrix)
        return loss

    def _natural_gradients(self, guard: amp.StepGuard) -> list:
        """K-FAC: this step's natural gradients as the plan's input; returns the
        statistics updates to commit once the step is accepted."""
        from curvc.runtime import kfac
        if self._tracker is None:
            raise RuntimeError(f"{type(self).__name__} needs the model's layers: construct it "
                               f"with the model ({type(self).__name__}(model, ...)) or call "
                               "opt.track(model) before the first step")
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            if p.grad is not None:
                self._check_grad(p, p.grad)
        h = self._flat_hypers(self.param_groups[0])
        flags = self.host(h, self._next_step())[1]
        args = self.ESTIMATOR[3](h)
        self._estimates, updates = kfac.natural_gradients(
            self, self._tracker, params, beta=float(args["beta"]), damping=float(args["damping"]),
            accumulate=args["accumulate"] is None or flags[args["accumulate"]],
            invert=args["invert"] is None or flags[args["invert"]], grad_scale=guard.kfac_scale(),
            group=self._curvature_group(), iterate=args["iterate"], init=args["init"],
            bias_corrected=args["bias_corrected"], exponent=args["exponent"],
            damping_after=args["damping_after"], sign=args["sign"])
        return updates

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
        from curvc.runtime import distributed
        keys = list(estimates)
        return dict(zip(keys, distributed.average([estimates[k] for k in keys], group)))

    def _estimate_from_graph(self, guard: amp.StepGuard) -> None:
        """Hutchinson from gradients that carry their graph (backward(create_graph=True))."""
        from curvc.runtime import curvature
        pairs = [(p, p.grad) for p in self._trainable() if p.grad is not None]
        if all(g.grad_fn is None for _, g in pairs):
            return  # no graph at all: backward() ran without create_graph
        args = self.ESTIMATOR[3](self._flat_hypers(self.param_groups[0]))
        with torch.enable_grad():
            est = curvature.hutchinson([p for p, _ in pairs], [g for _, g in pairs],
                                       int(args["samples"]), args["distribution"],
                                       bool(args.get("spatial_average", False)))
        est = guard.unscale_from_graph([e.detach() for e in est])  # z Hz of a scaled loss
        self._estimates = self._averaged({p: e for (p, _), e in zip(pairs, est)})

    def _estimate_dense(self, logits, loss) -> None:
        """The dense structure's matrix for this step: the Hessian from ``loss``, or
        the Fisher from ``logits``."""
        from curvc.runtime import curvature, dense
        settings = self.dense(self._flat_hypers(self.param_groups[0]))
        params = self.param_groups[0]["params"]
        kind = settings["curvature"]
        with torch.enable_grad():
            if kind == "hessian" and loss is not None:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                matrix = dense.hessian(params, grads)
            elif kind == "fisher" and logits is not None:
                matrix = curvature.fisher_matrix(params, logits, int(settings["samples"]))
            else:
                wanted = "loss=" if kind == "hessian" else "logits="
                raise TypeError(f"{type(self).__name__}.estimate_curvature() needs {wanted}... "
                                f"for its {kind} curvature")
        self._estimates = self._averaged({"dense": matrix.detach()})

    def _missing_estimate_message(self, kind: str) -> str:
        name = type(self).__name__
        if kind in ("gauss_newton_bartlett", "fisher"):
            return (f"{name} refreshes its curvature on this step and needs the model's logits: "
                    f"before loss.backward(), call `if opt.wants_curvature(): "
                    f"opt.estimate_curvature(logits=logits)` (or pass step(curvature=[...]))")
        return (f"{name} estimates the Hessian diagonal on this step and needs second "
                f"derivatives: call loss.backward(create_graph=opt.wants_curvature()) before "
                f"step(), or opt.estimate_curvature(loss=loss), or pass step(curvature=[...])")

    def _release_graphs(self) -> None:
        """Drop gradients' graphs after use: p.grad -> graph -> p is a reference cycle
        that would keep every step's graph alive."""
        for p in self._trainable():
            if p.grad is not None and p.grad.grad_fn is not None:
                p.grad = p.grad.detach()
