"""The paper's one-step analysis, for any spec: what one step does to the local model.

For a step d from parameters theta with gradient g and Hessian H = Q diag(lambda) Q^T
(Section 1 of "A Unified View of Optimizers from an Approximated Curvature
Perspective"), with g^ = Q^T g and d^ = Q^T d:

    Delta_d     = -(g^T d + d^T H d / 2)       the decrease of the quadratic model
    ||d||_H^2   = d^T H d                       the step's length in the curvature's norm
    Delta_d^i   = -(g^_i d^_i + lambda_i d^_i^2 / 2)    (Delta_d = sum_i Delta_d^i)
    ||d_i||_H^2 = lambda_i d^_i^2

and, from minibatches b of size B (Section 2), with d_b the step a minibatch gives
and d_xi = d_b - d its noise, the noise term N_b = E[d_xi^T H d_xi] / 2 and the noise
length along each eigenvector, E[(e_i^T d_xi)^2]. Every spec takes its first step
from the same point with its own curvature estimate; the analysis is in float64.

Where a spec is one of the paper's rows (Newton with step alpha, normalized,
gradient-norm normalized and eigenbasis normalized NGD, GD, normalized GD, sign GD),
the paper's closed forms (``curvc.analyze_forms``) are evaluated beside the measured
values. Above ``EXACT_LIMIT`` parameters the Hessian is not formed: the totals come from
Hessian-vector products and the parts from the top eigenpairs (``curvc.spectrum``).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field

import torch

import curvc
from curvc import analyze_forms as forms, spectrum


# --- problems ------------------------------------------------------------------

@dataclass
class Problem:
    """A model at a fixed point, its data, and the exact Hessian of its mean loss there."""

    name: str
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    classification: bool

    def loss(self, model: torch.nn.Module, idx: torch.Tensor | None = None) -> torch.Tensor:
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        return self.loss_of(model(x), y)

    def loss_of(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return torch.nn.functional.cross_entropy(out, y)
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    def flat(self):
        """(theta as one vector, v -> the full-batch loss at parameters v, v -> the loss of
        each example at v), over the model's parameters in order."""
        names = [n for n, _ in self.model.named_parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        shapes = [p.shape for p in self.model.parameters()]

        def unflat(v):
            parts, at = {}, 0
            for n, s in zip(names, shapes):
                parts[n] = v[at:at + math.prod(s)].reshape(s)
                at += math.prod(s)
            return parts

        def f(v):
            return self.loss_of(torch.func.functional_call(self.model, unflat(v), (self.x,)),
                                self.y)

        def f_one(v, x, y):
            out = torch.func.functional_call(self.model, unflat(v), (x[None],))
            return self.loss_of(out, y[None])
        return flat, f, f_one

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def gradient_and_hessian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """g and H of the full-batch loss at the problem's point, over the flat parameters."""
        flat, f, _ = self.flat()
        return torch.func.grad(f)(flat), torch.func.hessian(f)(flat)

    def gradient_and_hvp(self) -> tuple[torch.Tensor, spectrum.MatVec]:
        """g and v -> H v, for models whose Hessian is too large to form."""
        flat, f, _ = self.flat()
        return torch.func.grad(f)(flat), spectrum.hessian_vector_product(f, flat)

    def per_example_gradients(self) -> torch.Tensor:
        """The gradient of each example's loss at the problem's point, one row each."""
        flat, _, f_one = self.flat()
        return torch.func.vmap(torch.func.grad(f_one), in_dims=(None, 0, 0))(flat, self.x,
                                                                              self.y)

    def minibatch_covariance(self, batch: int) -> torch.Tensor:
        """Sigma_b, the covariance of the mean gradient of ``batch`` examples drawn without
        replacement (as the analysis draws them): (N - B) / ((N - 1) B) Sigma."""
        rows = self.per_example_gradients()
        n = len(rows)
        centred = rows - rows.mean(0)
        sigma = centred.T @ centred / n
        return sigma * ((n - batch) / ((n - 1) * batch))


@dataclass(frozen=True)
class Basis:
    """What the analysis knows of H at the point: g, v -> H v, and eigenpairs (all of
    them, with H itself, or the top k by Lanczos, with ``h`` None)."""

    g: torch.Tensor
    hv: spectrum.MatVec
    lam: torch.Tensor
    q: torch.Tensor
    h: torch.Tensor | None

    @classmethod
    def of(cls, prob: "Problem", top: int | None = None) -> "Basis":
        """Exact (eigh of the formed Hessian) unless ``top`` asks for the top-k eigenpairs,
        or the model has more than EXACT_LIMIT parameters (then the top DEFAULT_TOP)."""
        if top is None and prob.parameter_count() <= EXACT_LIMIT:
            g, h = prob.gradient_and_hessian()
            lam, q = torch.linalg.eigh(h)
            return cls(g, lambda v: h @ v, lam, q, h)
        g, hv = prob.gradient_and_hvp()
        k = min(top or DEFAULT_TOP, len(g))
        lam, q = spectrum.lanczos(hv, len(g), k)
        return cls(g, hv, lam, q, None)


# Above this many parameters the Hessian (its square in float64) is not formed.
EXACT_LIMIT = 3000
DEFAULT_TOP = 32


def quadratic(n: int = 50, cond: float = 1e4, seed: int = 0, rows: int | None = None) -> Problem:
    """Least squares 1/(2N) ||X theta - y||^2 whose Hessian X^T X / N has eigenvalues
    log-spaced from 1 down to 1/cond, in a random basis: a linear layer, so every
    structure (K-FAC's layers included) applies, with per-example gradients for --batch."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or 4 * n
    lam = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    u, _ = torch.linalg.qr(torch.randn(rows, n, generator=g, dtype=torch.float64))
    x = math.sqrt(rows) * u * lam.sqrt() @ q.T
    y = x @ torch.randn(n, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(n, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, n, generator=g, dtype=torch.float64))
    return Problem(f"quadratic:n={n},cond={cond:g},seed={seed}", model, x, y, False)


def mlp_digits(hidden: int = 16, seed: int = 0) -> Problem:
    """A 64-hidden-10 tanh MLP on scikit-learn's digits (it ships with the package),
    at its initialisation; the exact Hessian by torch.func (about 1,200 parameters)."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                                torch.nn.Linear(hidden, 10)).double()
    return Problem(f"mlp:digits,hidden={hidden},seed={seed}", model,
                   torch.tensor(x, dtype=torch.float64) / 16.0, torch.tensor(y), True)


def problem(text: str) -> Problem:
    """``quadratic:n=50,cond=1e4,seed=0`` or ``mlp:digits[,hidden=16,seed=0]``."""
    kind, _, rest = text.partition(":")
    words = [w for w in rest.split(",") if w]
    opts = dict(w.split("=", 1) for w in words if "=" in w)
    try:
        if kind == "quadratic":
            return quadratic(int(opts.get("n", 50)), float(opts.get("cond", 1e4)),
                             int(opts.get("seed", 0)))
        if kind == "mlp" and words and words[0] == "digits":
            return mlp_digits(int(opts.get("hidden", 16)), int(opts.get("seed", 0)))
    except ValueError as e:
        raise ValueError(f"bad --problem {text!r}: {e}") from None
    raise ValueError(f"unknown --problem {text!r}: use quadratic:n=50,cond=1e4[,seed=0] "
                     "or mlp:digits[,hidden=16]")


# --- one step of a compiled optimizer ------------------------------------------

def step_of(cls, prob: Problem, idx: torch.Tensor | None = None,
            hypers: dict | None = None) -> torch.Tensor:
    """The flat step d = theta_1 - theta_0 the optimizer takes from the problem's point,
    on the full batch (or the rows ``idx``), each curvature source given what it needs."""
    model = copy.deepcopy(prob.model)
    params = list(model.parameters())
    start = torch.cat([p.detach().reshape(-1) for p in params])
    opt = cls(model, **(hypers or {}))  # the model: K-FAC hooks its layers
    source = getattr(cls, "curvature_source", lambda: None)()  # routed: its pipelines'
    if source is not None and source.needs_closure:
        def closure():
            opt.zero_grad()
            loss = prob.loss(model, idx)
            loss.backward()
            return loss
        opt.step(closure)
    else:
        opt.zero_grad()
        x, y = (prob.x, prob.y) if idx is None else (prob.x[idx], prob.y[idx])
        out = model(x)
        loss = prob.loss_of(out, y)
        if opt.wants_curvature():  # each estimator takes what it needs of these
            opt.estimate_curvature(logits=out if prob.classification else None, loss=loss)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    close = getattr(opt, "close", None)
    if close is not None:
        close()  # K-FAC's hooks
    return torch.cat([p.detach().reshape(-1) for p in params]) - start


# --- the analysis ----------------------------------------------------------------

@dataclass
class Analysis:
    spec: str
    delta: float
    norm_h: float
    norm_2: float
    lam: list[float]
    delta_i: list[float]
    norm_h_i: list[float]
    closed: dict = field(default_factory=dict)  # the paper's closed forms, where they apply
    noise: float | None = None  # N_b
    noise_i: list[float] | None = None  # E[(e_i^T d_xi)^2]
    complete: bool = True  # every eigenpair, or only the top k (Lanczos)
    noise_length: float | None = None  # E[||d_xi||^2]
    closed_noise: dict = field(default_factory=dict)  # the paper's N_b, where it applies

    def bands(self, count: int = 4) -> list[dict]:
        """Per-eigendirection values summed over eigenvalue bands: ``count`` log-spaced
        bands over the positive eigenvalues, and one for the others (if any)."""
        pos = [v for v in self.lam if v > 0]
        lo, hi = (math.log10(min(pos)), math.log10(max(pos))) if pos else (0.0, 0.0)
        width = (hi - lo) / count or 1.0

        def band(v: float) -> int:  # -1: not positive
            return -1 if v <= 0 else min(count - 1, int((math.log10(v) - lo) / width))
        which = [band(v) for v in self.lam]
        out = []
        for k in range(-1, count):
            idx = [i for i, w in enumerate(which) if w == k]
            if not idx:
                continue
            label = "lambda <= 0" if k < 0 else \
                f"{10 ** (lo + k * width):.2g} .. {10 ** (lo + (k + 1) * width):.2g}"
            row = {"band": label, "count": len(idx),
                   "delta": sum(self.delta_i[i] for i in idx),
                   "norm_h": sum(self.norm_h_i[i] for i in idx)}
            if self.noise_i is not None:
                row["noise"] = sum(self.noise_i[i] for i in idx)
            out.append(row)
        if not self.complete:  # the directions outside the top k, by difference
            row = {"band": "the rest", "count": None,
                   "delta": self.delta - sum(self.delta_i),
                   "norm_h": self.norm_h - sum(self.norm_h_i)}
            if self.noise_i is not None:
                row["noise"] = self.noise_length - sum(self.noise_i)
            out.append(row)
        return out

    def as_dict(self) -> dict:
        return {"spec": self.spec, "delta": self.delta, "norm_h_sq": self.norm_h,
                "norm_2": self.norm_2, "closed_form": self.closed, "noise": self.noise,
                "closed_noise": self.closed_noise, "complete": self.complete,
                "bands": self.bands(), "eigenvalues": self.lam, "delta_i": self.delta_i,
                "norm_h_sq_i": self.norm_h_i, "noise_i": self.noise_i}


def analyze(spec: str, prob: Problem, batch: int | None = None, samples: int = 32,
            hypers: dict | None = None, seed: int = 0, basis: Basis | None = None,
            top: int | None = None) -> Analysis:
    """One spec's first step on ``prob`` (see the module docstring); ``basis`` (from
    ``Basis.of(prob, top)``) is shared by ``analyze_all``."""
    cls = curvc.load(spec)
    basis = basis if basis is not None else Basis.of(prob, top)
    g, lam, q = basis.g, basis.lam, basis.q
    d = step_of(cls, prob, None, hypers)
    gh, dh = q.T @ g, q.T @ d
    delta_i = -(gh * dh + 0.5 * lam * dh ** 2)
    opt = curvc.to_ir(*curvc.compiler.read(spec))
    hd = basis.hv(d)
    result = Analysis(cls.__name__, float(-(g @ d + 0.5 * d @ hd)), float(d @ hd),
                      float(d.norm()), lam.tolist(), delta_i.tolist(),
                      (lam * dh ** 2).tolist(), complete=basis.h is not None)
    if basis.h is not None:
        result.closed = forms.closed_forms(opt, g, basis.h, lam, q, hypers or {})
    if batch:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.zeros_like(dh)
        total = length = 0.0
        for _ in range(samples):
            idx = torch.randperm(len(prob.x), generator=gen)[:batch]
            xi = step_of(cls, prob, idx, hypers) - d
            total += float(xi @ basis.hv(xi))
            length += float(xi @ xi)
            noise += (q.T @ xi) ** 2
        result.noise = 0.5 * total / samples
        result.noise_i = (noise / samples).tolist()
        result.noise_length = length / samples
        if basis.h is not None:
            result.closed_noise = forms.noise_forms(opt, lam, q, prob.minibatch_covariance(batch),
                                                    hypers or {})
    return result


def analyze_all(specs: list[str], prob: Problem, top: int | None = None,
                **kw) -> list[Analysis]:
    basis = Basis.of(prob, top)
    return [analyze(s, prob, basis=basis, **kw) for s in specs]


# --- output -------------------------------------------------------------------------

def table(results: list[Analysis], prob: Problem, batch: int | None = None) -> str:
    lines = [f"problem {prob.name}: one step from the same point"
             + (f", minibatch noise over batches of {batch}" if batch else ""), ""]
    if results and not results[0].complete:
        lines[-1:] = [f"(the top {len(results[0].lam)} eigenpairs of H by Lanczos; "
                      "'the rest' is the remainder of each total)", ""]
    if batch and any(r.closed_noise for r in results):
        lines[-1:] = ["(paper: N_b = tr(H A Sigma_b A^T) / 2 for d = -A g, A at the full-batch "
                      "curvature, Sigma_b the data's)", ""]
    head = f"{'spec':<30}{'Delta_d':>13}{'||d||_H^2':>13}{'||d||_2':>12}"
    head += f"{'N_b':>12}" if batch else ""
    lines += [head, "-" * len(head)]
    for r in results:
        row = f"{r.spec:<30}{r.delta:>13.5g}{r.norm_h:>13.5g}{r.norm_2:>12.4g}"
        if batch:
            row += f"{r.noise:>12.4g}"
        lines.append(row)
        if r.closed:
            line = (f"{'  paper: ' + r.closed['row']:<30}{r.closed['delta']:>13.5g}"
                    f"{r.closed['norm_h_sq']:>13.5g}")
            if batch and r.closed_noise:
                line += f"{'':>12}{r.closed_noise['noise']:>12.4g}"
            lines.append(line)
            if batch and r.closed_noise:
                lines.append(f"{'  paper, Sigma_b ~ (k/B) H':<30}{'':>38}"
                             f"{r.closed_noise['noise_kh']:>12.4g}")
    lines += ["", "per eigendirection, summed over eigenvalue bands "
              "(Delta_d^i | ||d_i||_H^2" + (" | E||d_xi,i||^2" if batch else "") + "):", ""]
    bands = [b["band"] for b in results[0].bands()] if results else []
    rows = []
    for r in results:
        cells = []
        for b in r.bands():
            cell = f"{b['delta']:.3g} | {b['norm_h']:.3g}"
            if batch:
                cell += f" | {b['noise']:.3g}"
            cells.append(cell)
        rows.append((r.spec, cells))
    width = 2 + max([len(c) for _, cells in rows for c in cells] + [len(b) for b in bands])
    lines.append(f"{'spec':<30}" + "".join(f"{b:>{width}}" for b in bands))
    lines += [f"{spec:<30}" + "".join(f"{c:>{width}}" for c in cells) for spec, cells in rows]
    return "\n".join(lines) + "\n"


def to_json(results: list[Analysis], prob: Problem) -> str:
    return json.dumps({"problem": prob.name, "specs": [r.as_dict() for r in results]}, indent=1)


def plot(results: list[Analysis], path: str, prob: Problem) -> None:
    """Delta_d^i and ||d_i||_H^2 against lambda_i, log axes, one curve per spec."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        pts = [(lam, di, ni) for lam, di, ni in zip(r.lam, r.delta_i, r.norm_h_i) if lam > 0]
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [max(abs(p[1]), 1e-30) for p in pts], ".-", label=r.spec, ms=3)
        axes[1].plot(xs, [max(p[2], 1e-30) for p in pts], ".-", label=r.spec, ms=3)
    for ax, what in zip(axes, ("|Delta_d^i| (decrease along e_i)", "||d_i||_H^2")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue lambda_i of H")
        ax.set_title(what)
        ax.grid(True, which="major", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"one step on {prob.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
