"""The seed programs converge under every backend, printing from rank 0 only.

Bounds: y = 2x + 1 + N(0, 0.05^2) has an irreducible MSE of 0.0025; after 10 epochs of SGD(0.01) the
final epoch's mean loss must be below 0.01, the kernel within 0.05 of 2 and the bias within 0.05 of 1.
"""

import json
import re

import numpy as np
import pytest

from shared_launches import TEST_TIMEOUT, job
from workers.seed_examples import MARKER, PROGRAMS

LAUNCHERS = ["single", "mirrored", "multiworker", "horovod-gloo"]
pytestmark = pytest.mark.timeout(TEST_TIMEOUT)  # a test may start its backend's shared launch


_RUNS: dict = {}


def seed_runs(launcher, tmp_path_factory) -> dict:
    """The four seed programs run one after another (tests/workers/seed_examples.py, a job of the
    launcher's shared launch: tests/shared_launches.py): for each program, its JSON record and its own
    part of rank 0's stdout."""
    if launcher not in _RUNS:
        launched = job(launcher, "seed", tmp_path_factory)
        out_dir = launched.out
        assert all(printed == "" for printed in launched.stdout[1:]), launched.stdout  # rank 0 only
        lines = launched.stdout[0].splitlines()
        parts, current = {}, None
        for line in lines:
            if MARKER in line:
                current = line.split(MARKER, 1)[1].strip()
                parts[current] = []
            elif current:
                parts[current].append(line)
        assert sorted(parts) == sorted(PROGRAMS), launched.stdout[0]
        _RUNS[launcher] = {program: (json.loads((out_dir / f"{program[:-3]}.json").read_text()), "\n".join(part))
                           for program, part in parts.items()}
    return _RUNS[launcher]


def train(example, launcher, tmp_path_factory):
    result, stdout = seed_runs(launcher, tmp_path_factory)[example]
    assert result["replicas"] == (1 if launcher == "single" else 2)
    epoch_lines = [line for line in stdout.splitlines() if re.search(r"epoch \d+/\d+ - ", line)]
    assert len(epoch_lines) == 10, stdout  # printed by rank 0 only: once per epoch, not per rank
    return result


def assert_converged(result):
    history = result["history"]
    assert history["loss"][-1] < 0.01, history["loss"]
    assert history["loss"] == sorted(history["loss"], reverse=True), "loss must fall every epoch"
    assert abs(result["kernel"] - 2.0) < 0.05 and abs(result["bias"] - 1.0) < 0.05, result


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_basic_loop(launcher, tmp_path_factory):
    result = train("linear_regression.py", launcher, tmp_path_factory)
    assert_converged(result)
    assert result["history"]["lr"] == [pytest.approx(0.01)] * 10


@pytest.fixture(scope="module")
def single_device_mae(tmp_path_factory):
    return train("linear_regression_mae.py", "single", tmp_path_factory)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_custom_mae_metric(launcher, tmp_path_factory, single_device_mae):
    """The seed's plain-function MAE, given as Trainer(metrics=[mae]): exact on 2 replicas (the exact
    split makes them train like one device), not doubled as a value returned from the step would be."""
    result = train("linear_regression_mae.py", launcher, tmp_path_factory)
    assert_converged(result)
    mae = result["history"]["mae"]
    # |N(0, s^2)| has mean s*sqrt(2/pi): the MAE can't go below ~0.04 and must get close to it
    assert 0.035 < mae[-1] < 0.08, mae
    assert mae[0] > 10 * mae[-1]
    assert mae == pytest.approx(single_device_mae["history"]["mae"], rel=1e-4)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_loss_threshold_lr_cut(launcher, tmp_path_factory):
    result = train("linear_regression_lr_cut.py", launcher, tmp_path_factory)
    history = result["history"]
    assert history["loss"][-1] < 0.01
    first_below = next(i for i, loss in enumerate(history["loss"]) if loss < 0.01)
    # the LR logged for epoch e is the one used during e: the cut shows from the epoch after
    expected = [pytest.approx(0.01)] * (first_below + 1) + [pytest.approx(0.001)] * (len(history["lr"]) - first_below - 1)
    assert history["lr"] == expected, (history["loss"], history["lr"])


@pytest.mark.parametrize("launcher", ["horovod-gloo"])
def test_sharded_digits_reads_its_own_shards_and_learns(launcher, tmp_path_factory):
    out = job(launcher, "digits", tmp_path_factory).out
    history = json.loads((out / "history.json").read_text())
    assert history["val_accuracy"][-1] >= 0.9, history["val_accuracy"]
    assert len(list((out / "data").rglob("*.tfrecord"))) >= 8


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sum_of_two(launcher, tmp_path_factory):
    """One example per replica per step; the progress bar (rank 0 only) shows the running mean loss,
    which falls every epoch; the test loop's mean loss is the single-device value of the final model."""
    result, stdout = seed_runs(launcher, tmp_path_factory)["sum_of_two.py"]
    replicas = 1 if launcher == "single" else 2
    assert result["replicas"] == replicas
    loss = result["history"]["loss"]
    assert len(loss) == 5 and all(b < a for a, b in zip(loss, loss[1:])), loss
    assert loss[-1] < 0.985 * loss[0], loss  # Adam(1e-4) is slow: -5% in 500 steps (1 replica), -3% in 250 (2)
    lines = stdout.splitlines()
    progress = [line for line in lines if re.search(r"epoch \d/5 \d+/\d+ - loss [\d.]+", line)]
    assert len(progress) == 5 * (100 // replicas) // 10, stdout  # every 10 steps, rank 0 only
    x, y = np.array(result["test_x"]), np.array(result["test_y"])
    prediction = x @ np.array(result["kernel"]).reshape(2, 1) + np.array(result["bias"])
    expected = float(np.mean(np.sum((y - prediction) ** 2, axis=-1)))
    assert result["test_loss"] == pytest.approx(expected, rel=1e-5)
    printed = [float(m.group(1)) for m in map(re.compile(r"mean test loss over 10 pairs: ([\d.]+)").search, lines) if m]
    assert printed == [pytest.approx(expected, rel=1e-4)], stdout
