"""The eigenbasis stage of a plan: a diagonal pipeline inside the Kronecker factors' basis."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EigenbasisStage:
    """Per tensor, the diagonal pipeline of the spec's iterate, length and damping run in
    the eigenbasis Q of Kronecker factors (``structure kronecker(basis = eigen)``: SOAP,
    EKFAC), run by ``curvc.runtime.eigenbasis.eigenbasis``.

    The statistic G is rotated, G' = Q^T G (along every mode), its square accumulated into
    V (``accumulate``: 'ema' with weight 1 - beta, 'sum' from ``init``, or 'instant'); the
    value M is rotated the same way, divided by P = root(V / bias_correction) (exponent,
    eps_inside, eps_after, floor as a diagonal P's; ``length='eigen_sign'``: sign(M')), and
    rotated back. The factors are EMAs (``factor_beta``) of the Gram matrices of G's
    unfoldings, accumulated after the step; the basis is refreshed (``method``: 'power_qr'
    or 'eigh') when the flag ``refresh`` holds. The first call returns 0 (no basis yet).
    ``merge``: adjacent small dims merged into modes up to ``max_dim`` (``layout`` 1: a
    4-D tensor's NHWC dims taken as NCHW first); ``vectors``: a
    tensor of order 1 keeps a factor (else its basis is I).
    """

    name: str
    accumulate: str  # 'ema' | 'sum' | 'instant'
    refresh: str | None  # flag: a new basis after this step (None: every step)
    method: str  # 'power_qr' | 'eigh'
    length: str = "root"  # 'root' | 'eigen_sign'
    function: str = "eigenbasis"
    accumulate_when = None  # V and the factors take every step's statistic
    params: tuple[str, ...] = ("factor_beta", "weight", "init", "exponent", "eps_inside",
                               "eps_after", "floor", "bias_correction", "max_dim", "merge",
                               "vectors", "layout")

    reads_param = False

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.refresh,) if self.refresh else ()

    def keywords(self, params: list[str], flag) -> list[str]:
        return [f"accumulate={self.accumulate!r}", f"refresh={flag(self.refresh)}",
                f"method={self.method!r}", f"length={self.length!r}",
                *(f"{n}={a}" for n, a in zip(self.params, params))]

    @property
    def doc(self) -> str:
        what = "sign" if self.length == "eigen_sign" else "value"
        return (f"One tensor's step in its Kronecker factors' eigenbasis: the {what} rotated "
                f"in, divided by the root of the rotated statistic's {self.accumulate} "
                f"square, rotated back; the basis refreshed by {self.method}.")
