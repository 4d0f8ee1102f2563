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


def _program(launcher, program, tmp_path_factory):
    """A program's record on ``launcher`` and on one device (both from the shared seed launches)."""
    result, stdout = seed_runs(launcher, tmp_path_factory)[program]
    assert result["replicas"] == (1 if launcher == "single" else 2)
    single, _ = seed_runs("single", tmp_path_factory)[program]
    return result, stdout, single


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_gan_two_models_two_optimizers_match_one_device_and_the_generator_is_saved_once(launcher, tmp_path_factory):
    """examples/gan.py: alternating discriminator and generator updates, each optimizer built by disttrain on
    its own model; the generator learns the real mean; 2 replicas give the single device's losses; the
    chief alone writes the generator (SavedModel and .keras), which every process loads back exactly."""
    result, stdout, single = _program(launcher, "gan.py", tmp_path_factory)
    assert result["start_distance"] > 2.5 and result["distance"] < 0.5, result  # N((2, -1), .5^2) learnt
    for name in ("d_loss", "g_loss"):
        assert result["history"][name] == pytest.approx(single["history"][name], rel=1e-4), name
    assert result["served_max_diff"] == 0.0 and result["keras_max_diff"] == 0.0, result
    assert result["saved"] == ["generator.keras", "generator_serving"], result  # no worker's temporary copy
    assert "generated mean" in stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_custom_training_tutorial_port_matches_one_device(launcher, tmp_path_factory):
    """examples/custom_training.py, TF's tf.distribute tutorial on the digits: its report printed once,
    regularised conv net with Adam, the same global batch on every backend gives the single device's numbers."""
    result, stdout, single = _program(launcher, "custom_training.py", tmp_path_factory)
    history = result["history"]
    assert result["global_batch_size"] == 64
    assert history["val_test_accuracy"][-1] > 0.6, history
    for name in ("loss", "val_test_loss", "train_accuracy", "val_test_accuracy"):
        assert history[name] == pytest.approx(single["history"][name], rel=1e-4), name
    assert len(re.findall(r"^Epoch \d, Loss: [\d.]+, Accuracy: [\d.]+, Test Loss: [\d.]+, Test Accuracy: [\d.]+$",
                          stdout, re.M)) == 2, stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_synthetic_benchmark_port_prints_horovods_report(launcher, tmp_path_factory):
    """examples/synthetic_benchmark.py: Horovod's report (img/sec per device per iteration, mean, total),
    from throughput that leaves out tracing; the fixed batch trains (the loss falls)."""
    result, stdout, _ = _program(launcher, "synthetic_benchmark.py", tmp_path_factory)
    devices = result["replicas"]
    iters = [float(v) for v in re.findall(r"^Iter #\d: ([\d.]+) img/sec per CPU$", stdout, re.M)]
    assert iters == [pytest.approx(v, rel=1e-3, abs=0.1) for v in result["img_secs"]] and len(iters) == 3, stdout
    assert all(v > 0 for v in iters)
    total = re.search(rf"^Total img/sec on {devices} CPU\(s\): ([\d.]+) \+-[\d.]+$", stdout, re.M)
    assert total and float(total.group(1)) == pytest.approx(devices * np.mean(result["img_secs"]), rel=1e-3, abs=0.1)
    loss = result["history"]["loss"]
    assert loss[-1] < loss[0], loss
