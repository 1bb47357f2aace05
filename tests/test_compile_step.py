"""A training step compiled with torch.compile that calls a curvc optimizer's step().

The step runs outside dynamo (a graph break around it) through curvc's own fused
or eager paths, so an LR scheduler moving a float or tensor ``lr`` recompiles
nothing: no more recompiles than ``torch.optim.Adam`` in the same loop (counted
from dynamo's ``recompiles`` log, what ``TORCH_LOGS=recompiles`` prints), and the
same numbers as the uncompiled run.
"""
import contextlib
import logging

import pytest
import torch

import curvc

pytestmark = pytest.mark.slow
STEPS = 20


@contextlib.contextmanager
def _recompiles():
    """The messages of dynamo's recompiles log while the block runs."""
    import torch._dynamo
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            if "Recompiling function" in record.getMessage():
                seen.append(record.getMessage().splitlines()[0])
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    handler = Collect(level=logging.DEBUG)
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()


def _train(make_opt, lr, compile_backend=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = make_opt(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g))
            for _ in range(STEPS)]

    def train_step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss
    if compile_backend is not None:
        train_step = torch.compile(train_step, backend=compile_backend)
    for x, y in data:
        train_step(x, y)
        schedule.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("lr", [1e-2, "tensor"], ids=["float-lr", "tensor-lr"])
def test_a_compiled_step_with_a_scheduler_recompiles_no_more_than_torch_adam(lr):
    Adam = curvc.load("adam")
    counts = {}
    for name, make in (("torch", torch.optim.Adam), ("curvc", Adam)):
        with _recompiles() as seen:
            _train(make, torch.tensor(1e-2) if lr == "tensor" else lr, compile_backend="eager")
        counts[name] = seen
    assert len(counts["curvc"]) <= len(counts["torch"]), counts


def test_a_compiled_training_step_gives_the_uncompiled_numbers():
    """Inductor compiles the model's forward and backward; the step is curvc's."""
    import torch._dynamo
    Adam = curvc.load("adam")
    torch._dynamo.reset()
    compiled = _train(Adam, 1e-2, compile_backend="inductor")
    torch._dynamo.reset()
    eager = _train(Adam, 1e-2)
    reference = _train(torch.optim.Adam, 1e-2)
    for c, e, r in zip(compiled, eager, reference):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e, r, rtol=1e-5, atol=1e-6)
