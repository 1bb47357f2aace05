"""Shared fixtures: a small real classification problem and a training loop.

The data is scikit-learn's digits set (it ships inside the package, so no
download): 1797 8x8 images, 10 classes.
"""
import os
import shutil
import tempfile

import pytest
import torch

# Generated modules go to a private cache, not the user's ~/.cache, removed at the end.
_OWN_CACHE = None
if "CURVC_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["CURVC_CACHE_DIR"] = tempfile.mkdtemp(prefix="curvc-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors. The
# variable must be set before any module (torch.compile included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The tests' tensors are tiny, so torch's intra-op threads only add a barrier per op;
# on a busy machine each barrier waits for a time slice (a cross-product spec's exact
# Hessian diagonal: 9 s with 2 threads, 0.4 s with 1). Results are compared within one
# process, under the same setting. The fused CPU path compiles OpenMP-parallel code
# sized by the thread count, so its tests keep the default.
_THREADS = torch.get_num_threads()
_DEFAULT_THREADS = {"test_fused_cpu.py", "test_compile_step.py"}
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _default_threads_for_the_fused_path(request):
    if request.path.name not in _DEFAULT_THREADS:
        yield
        return
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    return x, torch.tensor(y, dtype=torch.long)


def make_mlp(seed: int = 0, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, 10))


def two_groups(model: torch.nn.Module, first: dict, second: dict) -> list[dict]:
    """The first layer and the last layer as separate param groups."""
    return [{"params": list(model[0].parameters()), **first},
            {"params": list(model[2].parameters()), **second}]


def batches(data, steps: int, batch: int = 128, seed: int = 0):
    """A fixed sequence of minibatches, identical for every optimizer under test."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        yield x[idx], y[idx]


def train(model, opt, data, steps: int, seed: int = 0, scheduler=None) -> list[float]:
    losses = []
    for xb, yb in batches(data, steps, seed=seed):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def max_relative_error(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """max over parameters of ||a - b|| / ||a||."""
    return max(((pa - pb).norm() / pa.norm()).item()
               for pa, pb in zip(a.parameters(), b.parameters()))
