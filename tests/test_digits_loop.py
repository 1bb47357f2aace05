"""examples/digits_loop.py's data: the digits read from scikit-learn's shipped CSV are
the arrays scikit-learn's own loader returns, by either route."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def loop(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import digits_loop
    return digits_loop


def test_the_digits_read_from_the_shipped_csv_are_sklearns(loop):
    from sklearn.datasets import load_digits
    x_ref, y_ref = load_digits(return_X_y=True)
    x, y = loop.digits_arrays()
    assert x.shape == (1797, 64) and x.dtype == x_ref.dtype and y.dtype == y_ref.dtype
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)


def test_without_the_csv_where_expected_the_digits_come_from_sklearns_loader(loop, monkeypatch):
    from sklearn.datasets import load_digits
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    x, y = loop.digits_arrays()
    x_ref, y_ref = load_digits(return_X_y=True)
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)


def test_threads_below_one_are_refused(loop):
    with pytest.raises(SystemExit, match="--threads must be at least 1, got 0"):
        loop.use_threads(0)
