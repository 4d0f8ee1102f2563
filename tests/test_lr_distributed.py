"""Every LR policy under every backend, on data whose local losses differ on purpose between replicas:
each rank records the same LR timeline, bit for bit, and it is the one a single process computes from
the global mean loss (and not the one the local losses would give).

One job of each backend's shared launch (tests/shared_launches.py) runs all policies
(tests/workers/lr_sync.py with tests/workers/lr_configs.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared_launches import TEST_TIMEOUT, job
from workers.lr_configs import EPOCHS, PER_REPLICA_BATCH, STEPS, make_controller, make_optimizer

CONFIGS = ("float", "schedule", "cosine")
RULES = {"loss_threshold_cut", "reduce_on_plateau", "user"}


def replay(name: str, history: dict, *, replicas: int, loss: list[float] | None = None) -> dict:
    """What one process decides for config ``name`` from the logged (global) values in ``history``,
    or from ``loss`` instead of ``history["loss"]``: epoch-start LRs, every step's LR, next LRs."""
    import disttrain as dt

    backend = dt.get_backend("single", threads=1)
    import types

    with backend.scope():
        optimizer = make_optimizer(name)
    controller = make_controller(name)
    controller.install(optimizer, backend=backend, num_replicas=replicas,
                       global_batch_size=PER_REPLICA_BATCH * replicas)
    trainer = types.SimpleNamespace(optimizer=optimizer, backend=backend, metrics=[], eval_metrics=[])
    for rule in controller.rules:
        rule.setup(trainer)
    out = {"lr": [], "step_lrs": [], "next_lr": [], "changes": []}
    for epoch in range(EPOCHS):
        optimizer.iterations.assign(epoch * STEPS)
        out["lr"].append(controller.learning_rate)
        out["step_lrs"].append([controller.lr_at(s) for s in range(epoch * STEPS, (epoch + 1) * STEPS)])
        optimizer.iterations.assign((epoch + 1) * STEPS)
        logs = {k: v[epoch] for k, v in history.items()}
        if loss is not None:
            logs["loss"] = loss[epoch]
        controller.on_epoch_end(trainer, epoch, logs)
        out["next_lr"].append(controller.timeline[-1]["next_lr"])
        out["changes"].append(controller.timeline[-1]["changes"])
    return out


def without_timing(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "history"} | {
        "history": {k: v for k, v in config["history"].items() if k != "examples_per_sec"}}


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("backend", ["single", "mirrored", "multiworker", "horovod-gloo"])
def test_lr_timeline_identical_on_every_rank_and_decided_on_global_loss(backend, tmp_path_factory):
    tmp_path = job(backend, "lr", tmp_path_factory).out
    processes = 1 if backend in ("single", "mirrored") else 2
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]
    replicas = ranks[0]["replicas"]
    assert replicas == (1 if backend == "single" else 2), ranks[0]
    fired = set()
    for name in CONFIGS:
        configs = [without_timing(r["configs"][name]) for r in ranks]
        first = configs[0]
        assert first["steps"] == EPOCHS * STEPS
        for rank, other in enumerate(configs[1:], start=1):  # bitwise: JSON floats round-trip exactly
            assert json.dumps(other, sort_keys=True) == json.dumps(first, sort_keys=True), \
                f"{backend}/{name}: rank {rank}'s LR timeline, state or weights differ from rank 0's"

        history = first["history"]
        want = replay(name, history, replicas=replicas)
        assert history["lr"] == want["lr"], f"{backend}/{name}: logged LR is not the replayed global one"
        assert first["step_lrs"] == want["step_lrs"], f"{backend}/{name}: per-step LRs differ"
        assert [t["next_lr"] for t in first["timeline"]] == want["next_lr"]
        assert [t["changes"] for t in first["timeline"]] == want["changes"]
        fired |= {rule for epoch in want["changes"] for rule in epoch}

        if replicas == 2:
            # each replica's own epoch loss (its share of the global mean, times the replica count)
            local = [[replicas * v for v in history[f"share_r{r}"]] for r in range(2)]
            np.testing.assert_allclose(np.mean(local, axis=0), history["loss"], rtol=1e-5)
            assert all(b > 4 * a for a, b in zip(local[0][-4:], local[1][-4:])), \
                f"{backend}/{name}: the replicas' local losses should differ a lot: {local}"
            if name == "float":  # deciding on either replica's local loss gives another timeline
                for r in range(2):
                    assert replay(name, history, replicas=replicas, loss=local[r])["next_lr"] != want["next_lr"]
    assert fired == RULES, f"{backend}: every rule must have changed the LR at least once, fired {fired}"

    # The LRs the compiled step applied (read back from a weight whose gradient is exactly 1) are the
    # controller's, on every rank.
    for rank in ranks:
        probe = rank["probe"]
        assert probe["history"]["lr"] == [lrs[0] for lrs in probe["step_lrs"]]
        moved = -np.diff([0.0] + probe["weights"])
        np.testing.assert_allclose(moved, [sum(lrs) for lrs in probe["step_lrs"]], rtol=1e-5)
        assert len({round(float(m), 6) for m in moved}) > 3 and any(probe["changes"]), probe
