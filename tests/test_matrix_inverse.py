"""K-FAC's damped inverse (F + gamma I)^-1 (``curvc.runtime.roots.inverse_root``, exponent 1):
a Cholesky factorization in float32 for a float32 factor while LAPACK's error bound,
n eps kappa with kappa estimated from the pivots, stays below 1%; in float64 otherwise."""
import torch

import curvc
from curvc.runtime.roots import inverse_root


def _spd(n: int, condition: float, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Q diag(w) Q^T with eigenvalues spread log-evenly from 1 down to 1 / condition."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    w = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64)
    return ((q * w) @ q.T).to(dtype)


def _cholesky_inverse_in(a: torch.Tensor, damping: float, dtype) -> torch.Tensor:
    """The damped inverse written out: symmetrize, damp the diagonal, Cholesky, invert."""
    s = a.to(dtype)
    s = (s + s.T) * 0.5 + damping * torch.eye(s.shape[0], dtype=dtype)
    return torch.cholesky_inverse(torch.linalg.cholesky(s)).to(a.dtype)


def test_a_well_conditioned_float32_factor_is_inverted_in_float32():
    a = _spd(96, condition=10.0)
    got = inverse_root(a, 1.0, 1e-3)
    assert got.dtype == torch.float32
    assert torch.equal(got, _cholesky_inverse_in(a, 1e-3, torch.float32))
    exact = _cholesky_inverse_in(a.double(), 1e-3, torch.float64)
    bound = 96 * torch.finfo(torch.float32).eps * 10.0  # n eps kappa
    assert ((got.double() - exact).norm() / exact.norm()).item() < bound


def test_an_ill_conditioned_float32_factor_is_inverted_in_float64():
    """kappa = 1e5 at n = 96: n eps kappa is about 1, float32 would keep no digit."""
    a = _spd(96, condition=1e5)
    got = inverse_root(a, 1.0, 0.0, start=1.0)  # a started factor: Cholesky's way
    assert torch.equal(got, _cholesky_inverse_in(a, 0.0, torch.float64))
    exact = torch.linalg.inv(a.double())
    in_float32 = _cholesky_inverse_in(a, 0.0, torch.float32)
    error = lambda x: ((x.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(got) < error(in_float32) / 10


def test_an_undamped_factor_from_zero_takes_the_pseudo_inverse_even_where_cholesky_passes():
    """S of a softmax layer: its rows' gradients sum to 0 over the classes, so S has the
    null vector (1, 1, 1), at rounding level after the products. Cholesky can pass on
    it (a pivot of noise, an inverse of 1e16s); the pseudo-inverse drops that direction."""
    gen = torch.Generator().manual_seed(3)
    ds = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    ds = ds - ds.mean(dim=1, keepdim=True)  # each row sums to 0
    s = ds.T @ ds
    got = inverse_root(s, 1.0, 0.0)  # no damping, no start: it can be singular
    w, q = torch.linalg.eigh(s)
    keep = w > w.abs().max() * 3 * torch.finfo(w.dtype).eps
    want = (q[:, keep] / w[keep]) @ q[:, keep].T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert got.abs().max() < 1e3


def test_a_float64_factor_is_inverted_in_float64():
    a = _spd(64, condition=10.0, dtype=torch.float64)
    assert torch.equal(inverse_root(a, 1.0, 1e-3), _cholesky_inverse_in(a, 1e-3, torch.float64))


def test_a_float32_kfac_run_follows_the_float64_one():
    """Ten steps of K-FAC (inverses every 2) on a float32 MLP stay within float32's
    reach of the same run in float64."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    models = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 3)).to(dtype)
        opt = curvc.load("kfac")(net, lr=0.05, stat_every=1, inverse_every=2, damping=1e-2)
        for _ in range(10):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x.to(dtype)), y).backward()
            opt.step()
        models[dtype] = net
    for p, q in zip(models[torch.float32].parameters(), models[torch.float64].parameters()):
        torch.testing.assert_close(p.double(), q.detach(), rtol=1e-4, atol=1e-5)
