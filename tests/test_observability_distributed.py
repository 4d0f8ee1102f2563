"""Real launches: only the chief writes TensorBoard files and prints; what it writes is the global value.

One job of each backend's shared launch (tests/shared_launches.py) checks everything at once:
  * event files exist only under the chief's logdir, from the chief's process, and no rank wrote
    anything else (its working directory stays empty);
  * TensorBoard's own reader (EventAccumulator) finds the step/epoch scalars, histograms and the
    config text, and its values equal the history and step logs each rank reports;
  * every rank's callbacks got identical step logs (they were reduced, not local);
  * the weighted metric is the exact global value and NOT the mean of the per-replica means;
  * only rank 0 printed the progress bar, and the other ranks printed nothing at all.
"""

import json
import math
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from shared_launches import TEST_TIMEOUT, job

STEPS, EPOCHS, LOG_EVERY, HIST_EVERY = 6, 2, 2, 3
SCALARS = ["loss", "target_mean", "mse", "lr", "examples_per_sec", "step_time"]

pytestmark = pytest.mark.timeout(TEST_TIMEOUT)  # the first test may start the shared launch
# backend -> processes (multiworker creates its callbacks on the chief only: see tests/shared_launches.py)
CASES = {"horovod-gloo": 2, "multiworker": 2, "mirrored": 1}


def read_events(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    tensors = {}
    for tag in acc.Tags()["tensors"]:
        tensors[tag] = {e.step: tensor_util.make_ndarray(e.tensor_proto)
                        for e in acc.Tensors(tag)}
    return tensors


@pytest.fixture(scope="module", params=list(CASES))
def launched(request, tmp_path_factory):
    backend = request.param
    launch = job(backend, "obs", tmp_path_factory)
    infos = [json.loads((launch.out / f"rank{r}.json").read_text()) for r in range(CASES[backend])]
    return backend, launch.out, infos, launch.stdout


def test_only_the_chief_writes_files(launched):
    backend, out, infos, _ = launched
    assert [i["rank"] for i in infos] == list(range(len(infos))) and infos[0]["is_chief"]
    assert not any(i["is_chief"] for i in infos[1:])
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    events = [n for n in names if "tfevents" in n]
    assert len(events) == 1 and events[0].startswith("tb/"), names
    assert f".{infos[0]['pid']}." in events[0], (events, infos[0]["pid"])  # written by the chief's process
    expected = {f"rank{r}.json" for r in range(len(infos))} | {"metrics.jsonl", events[0]}
    assert set(names) == expected, f"unexpected files: {set(names) ^ expected}"
    assert not any((out / "work").iterdir())


def test_tensorboard_values_are_the_global_ones(launched):
    backend, out, infos, _ = launched
    chief = infos[0]
    for other in infos[1:]:  # reduced values: every process's callbacks got exactly the same numbers
        assert [s[:3] for s in other["steps"]] == [s[:3] for s in chief["steps"]]
        for mine, theirs in zip(chief["steps"], other["steps"]):
            assert {k: v for k, v in mine[3].items() if k not in ("examples_per_sec", "step_time")} == \
                   {k: v for k, v in theirs[3].items() if k not in ("examples_per_sec", "step_time")}
            assert mine[3]["examples_per_sec"] == pytest.approx(theirs[3]["examples_per_sec"], rel=1e-9)
        # epoch values too, including the throughput (the mean wall time over processes)
        assert other["history"] == chief["history"]
        assert other["histograms"] == chief["histograms"]

    tensors = read_events(out / "tb")
    log_steps = list(range(LOG_EVERY, STEPS * EPOCHS + 1, LOG_EVERY))
    assert [s[0] for s in chief["steps"]] == log_steps
    for name in SCALARS:
        written = tensors[f"step/{name}"]
        assert sorted(written) == log_steps, name
        for step, _, _, logs in chief["steps"]:
            assert float(written[step]) == pytest.approx(logs[name], rel=1e-6, abs=1e-9), (name, step)
    history = chief["history"]
    for name in SCALARS + ["val_loss", "val_target_mean"]:
        written = tensors[f"epoch/{name}"]
        assert sorted(written) == list(range(EPOCHS)), name
        for epoch in range(EPOCHS):
            assert float(written[epoch]) == pytest.approx(history[name][epoch], rel=1e-6), (name, epoch)
    # the running step value at an epoch's last step is that epoch's value
    for step, epoch, epoch_step, logs in chief["steps"]:
        if epoch_step == STEPS:
            for name in ("loss", "target_mean", "mse"):
                assert logs[name] == pytest.approx(history[name][epoch], rel=1e-9), (name, step)

    hist_steps = list(range(HIST_EVERY, STEPS * EPOCHS + 1, HIST_EVERY))
    variables = ["obs/dense/kernel", "obs/dense/bias", "obs/dense_1/kernel", "obs/dense_1/bias"]
    for kind in ("weights", "gradients"):
        for var in variables:
            written = tensors[f"{kind}/{var}"]
            assert sorted(written) == hist_steps, (kind, var)
    assert [h[0] for h in chief["histograms"]] == hist_steps
    for step, grads in chief["histograms"]:
        assert sorted(grads) == sorted(variables)
        for var, (shape, total) in grads.items():
            buckets = written = tensors[f"gradients/{var}"][step]  # [k, 3]: left edge, right edge, count
            assert float(buckets[:, 2].sum()) == pytest.approx(float(np.prod(shape)))
    config = tensors["config"][0].item().decode()
    assert "| worker | obs_train |" in config and f"| replicas | {chief['replicas']} |" in config

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["config"] + (["step"] * (STEPS // LOG_EVERY) + ["epoch"]) * EPOCHS
    steps = [line for line in lines if line["event"] == "step"]
    for line, (step, _, _, logs) in zip(steps, chief["steps"]):
        assert line["step"] == step and all(line[k] == logs[k] for k in logs)
    epochs = [line for line in lines if line["event"] == "epoch"]
    assert [line["loss"] for line in epochs] == history["loss"]


def test_metric_is_exact_not_mean_of_means(launched):
    _, _, infos, _ = launched
    sums = {}
    for info in infos:
        sums.update(info["replica_sums"])
    assert len(sums) == 2, sums  # 2 replicas in every case
    exact = sum(s["sum_wy"] for s in sums.values()) / sum(s["sum_w"] for s in sums.values())
    mean_of_means = float(np.mean([s["sum_wy"] / s["sum_w"] for s in sums.values()]))
    assert abs(exact - mean_of_means) > 1.0  # the data makes the wrong answer clearly wrong
    history = infos[0]["history"]
    for epoch in range(EPOCHS):
        assert history["target_mean"][epoch] == pytest.approx(exact, rel=1e-6)
        assert history["val_target_mean"][epoch] == pytest.approx(exact, rel=1e-6)
        assert not math.isclose(history["target_mean"][epoch], mean_of_means, rel_tol=1e-3)
    if len(infos) == 2:  # one replica per process: each rank's own metric is its replica's mean
        local = [info["local_results"]["target_mean"] for info in infos]
        assert local == pytest.approx([s["sum_wy"] / s["sum_w"] for _, s in sorted(sums.items())], rel=1e-6)


def test_only_rank_zero_prints_progress(launched):
    _, _, _, stdout = launched  # each rank's own stdout during this run
    for r, printed in enumerate(stdout[1:], start=1):
        assert printed == "", f"rank {r} printed:\n{printed}"
    progress = re.compile(r"epoch \d+/\d+ \d+/\d+ - ")
    shown = [line for line in stdout[0].splitlines() if progress.search(line)]
    # per epoch: the step-log lines before the last step, then the epoch line (plain lines: not a tty)
    assert len(shown) == EPOCHS * (STEPS // LOG_EVERY), stdout[0][-3000:]
    assert all("target_mean" in line and "lr " in line for line in shown)
    assert sum("val_target_mean" in line for line in shown) == EPOCHS
