"""The example scripts run with each kind of optimizer and learn; their options
(--seed, --plot, the progress bar) and compare.py do what they say.

Each kind needs something different from the loop (nothing, logits, second
derivatives, the model, a closure); the scripts are what users copy, so they are
run here as they would run them.
"""
import os
import re
import runpy
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(script, args, tmp_path, **env):
    """The script as a user runs it, in a fresh interpreter. The timeout only guards
    against a hang: the run must not depend on an idle machine."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                         capture_output=True, text=True, cwd=tmp_path, timeout=3600,
                         env={**os.environ, "CURVC_CACHE_DIR": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr
    return out


def png_size(path):
    """(width, height) from a PNG's signature and IHDR chunk; fails on anything else."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# One epoch (24 steps) learns well past chance for every kind; L-BFGS (several loss
# evaluations per step) and the dense Newton step (a 650 x 650 curvature) take 4 steps.
# Adam's run is in a fresh interpreter, as a user runs the script (so are the progress
# bar's and compare.py's below); the other kinds run the same script in this one, which
# spares an interpreter start and torch's import each: what differs between kinds is
# what the loop hands the optimizer, not the interpreter.
@pytest.mark.parametrize("spec, lr, steps", [
    ("adam", "3e-3", None), ("sophia", "3e-3", None), ("adahessian", "0.1", None),
    ("shampoo", "0.03", None), ("kfac", "0.05", None), ("lbfgs", "1", 4),
    ("damped_newton", "1", 4), ("fisher_adam", "1e-2", None),
])
def test_train_digits_learns(spec, lr, steps, tmp_path, monkeypatch, capsys):
    args = ["--lr", lr, "--epochs", "1"] + (["--steps", str(steps)] if steps else [])
    if spec == "adam":
        stdout = run_example("train_digits.py", [spec, *args], tmp_path).stdout
    else:
        stdout = run_in_process([spec, *args], tmp_path, monkeypatch, capsys)
    accuracy = float(re.findall(r"test accuracy ([0-9.]+)", stdout)[-1])
    assert accuracy > 0.5, stdout


def test_train_digits_stops_after_the_given_steps(tmp_path, monkeypatch, capsys):
    """--steps caps the run across epochs: 30 steps of 24 per epoch end in epoch 2.
    (In-process: the option's arithmetic, not the interpreter, is under test.)"""
    out = run_in_process(["sgd", "--epochs", "5", "--steps", "30"], tmp_path, monkeypatch, capsys)
    epochs = [line.split()[1] for line in out.splitlines() if line.startswith("epoch")]
    assert epochs == ["1", "2"]


def run_in_process(argv, tmp_path, monkeypatch, capsys):
    """train_digits.py's stdout, run in this interpreter (stderr is not a terminal
    here, so no progress bar)."""
    monkeypatch.setenv("CURVC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the script's sys.path entry
    monkeypatch.setattr(sys, "argv", ["train_digits.py", *argv])
    runpy.run_path(str(ROOT / "examples" / "train_digits.py"), run_name="__main__")
    return capsys.readouterr().out


def losses(stdout):
    return re.findall(r"train loss ([0-9.]+)", stdout)


def test_train_digits_seed_makes_runs_repeat(tmp_path, monkeypatch, capsys):
    """--seed fixes the model's init, the batch order and the Hutchinson probes:
    the same seed prints the same losses; another seed other losses."""
    argv = ["adahessian", "--lr", "0.1", "--epochs", "3", "--steps", "30"]
    first = losses(run_in_process(argv + ["--seed", "3"], tmp_path, monkeypatch, capsys))
    again = losses(run_in_process(argv + ["--seed", "3"], tmp_path, monkeypatch, capsys))
    other = losses(run_in_process(argv + ["--seed", "4"], tmp_path, monkeypatch, capsys))
    assert len(first) == 2 and first == again
    assert other != first


def test_train_digits_plot_is_a_png_of_the_stated_size(tmp_path, monkeypatch, capsys):
    out = run_in_process(["sgd", "--epochs", "2", "--steps", "30", "--plot",
                          str(tmp_path / "curves.png")], tmp_path, monkeypatch, capsys)
    assert f"wrote {tmp_path / 'curves.png'}" in out
    assert png_size(tmp_path / "curves.png") == (1000, 400)  # 10 x 4 inches at 100 dpi


def test_train_digits_progress_bar_on_a_terminal_counts_closure_evaluations(
        tmp_path, monkeypatch, capsys):
    """With a terminal (FORCE_COLOR makes rich treat stderr as one) the bar shows
    L-BFGS's loss evaluations on stderr, and stdout keeps its plain epoch lines;
    with --no-progress, or where stderr is not a terminal (as under pytest), no bar."""
    args = ["lbfgs", "--epochs", "1", "--steps", "1"]
    shown = run_example("train_digits.py", args, tmp_path, FORCE_COLOR="1")
    assert re.search(r"1/1.* loss [0-9.]+ [1-9][0-9]* loss evaluations", shown.stderr), shown.stderr
    assert re.search(r"^epoch  1  train loss [0-9.]+  test accuracy [0-9.]+$",
                     shown.stdout, flags=re.M), shown.stdout
    monkeypatch.setenv("CURVC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = str(ROOT / "examples" / "train_digits.py")
    captured = []
    for extra, force in (([], None), (["--no-progress"], "1")):
        if force:
            monkeypatch.setenv("FORCE_COLOR", force)
        monkeypatch.setattr(sys, "argv", ["train_digits.py", *args, *extra])
        runpy.run_path(script, run_name="__main__")
        captured.append(capsys.readouterr())
    for out in captured:
        assert "loss evaluations" not in out.err and "\x1b" not in out.err + out.out
        assert losses(out.out) == losses(shown.stdout)


def table_rows(stdout):
    """compare.py's table: {(model, optimizer): (test accuracy, x first)}."""
    rows = re.findall(r"^(mlp|cnn) +(\w+) +[0-9.e+-]+ +([0-9.]+) +[0-9.]+ +([0-9.]+)$",
                      stdout, flags=re.M)
    return {(m, name): (float(acc), float(ratio)) for m, name, acc, ratio in rows}


def test_compare_trains_each_spec_on_both_models_and_plots_them(tmp_path):
    """An MLP and a CNN per spec (K-FAC on the CNN: its conv takes the plain
    gradient); the dense spec only on the MLP, with a note; one plot, a column per model."""
    out = run_example("compare.py", ["adam=3e-3", "kfac=0.05", "damped_newton=1", "--epochs", "1",
                                     "--steps", "3", "--plot", "cmp.png"], tmp_path)
    rows = table_rows(out.stdout)
    assert set(rows) == {("mlp", "Adam"), ("mlp", "KFAC"), ("mlp", "DampedNewton"),
                         ("cnn", "Adam"), ("cnn", "KFAC")}, out.stdout
    assert "DampedNewton skipped on the cnn" in out.stdout
    assert rows[("mlp", "Adam")][1] == 1.0 and rows[("cnn", "Adam")][1] == 1.0
    assert all(0 <= acc <= 1 for acc, _ in rows.values())
    assert png_size(tmp_path / "cmp.png") == (1000, 700)  # 5 x 7 inches a model, 100 dpi


def test_compare_gives_every_spec_the_same_start_and_batches(tmp_path, monkeypatch, capsys):
    """The same spec twice ends at the same accuracy, and at train_digits.py's for the
    same seed and steps: one shared loop, one initialisation, one batch order."""
    out = run_example("compare.py", ["sgd=0.5", "sgd=0.5", "--models", "mlp", "--seed", "2",
                                     "--epochs", "2", "--steps", "30"], tmp_path)
    accuracies = re.findall(r"^mlp +SGD +0.5 +([0-9.]+)", out.stdout, flags=re.M)
    single = run_in_process(["sgd", "--lr", "0.5", "--seed", "2", "--epochs", "2", "--steps", "30"],
                            tmp_path, monkeypatch, capsys)
    assert len(accuracies) == 2 and accuracies[0] == accuracies[1]
    assert accuracies[0] == re.findall(r"test accuracy ([0-9.]+)", single)[-1]


def test_compare_refuses_a_bad_learning_rate_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "compare.py"), "adam=fast"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=3600,
                         env={**os.environ, "CURVC_CACHE_DIR": str(tmp_path)})
    assert out.returncode != 0
    assert out.stderr.strip() == "error: 'adam=fast': the learning rate after '=' must be a number"
