"""Same model, data, seed and 20 steps: every backend ends with the single-device weights.

Five trainings per launch: SGD, Adam, two models with two optimizers (SGD+momentum and Adam) updated
in one step, as in a GAN, gradient clipping by the global norm (ctx.reduce_gradients), and Adam with
4 accumulated micro-batches per step (must match Adam on whole batches on one device); then mixed
precision (float16 and bfloat16, LossScaleOptimizer) on data with one inf example: the same step
skipped everywhere and counted in the logs. The same
launch then checks gradient compression: known per-replica tensors reduced with fp16 / bf16 (in small
buckets) must equal their sum taken in that dtype, and the SGD training with compression stays within
the tolerance the dtype implies, identical on every rank. The worker is one job of each backend's shared
launch (tests/shared_launches.py).
"""

import json

import ml_dtypes
import numpy as np
import pytest

from shared_launches import TEST_TIMEOUT, job


WIRE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "none": None}
# Relative weight difference from the uncompressed single-device run after 20 SGD steps: within
# what the wire dtype's rounding explains (fp16 keeps 11 significant bits, bf16 8), and above what
# float32 summation alone gives (1e-6 measured), so the compression did act.
COMPRESSED_TOLERANCE = {"fp16": (1e-5, 5e-3), "bf16": (1e-4, 3e-2)}


def load(directory, optimizer, rank):
    with np.load(directory / f"{optimizer}_rank{rank}.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return job("single", "equivalence", tmp_path_factory).out


# launcher: (expected backend, replicas in sync)
CASES = {
    "mirrored": ("mirrored", 2),
    "multiworker": ("multiworker", 2),
    "horovod-gloo": ("horovod", 2),
    "horovod-mpi": ("horovod", 2),
}


# Relative weight difference from one device allowed after 15 applied steps: a replica sums its share
# of the batch inside the layer's matmul in the compute dtype, so splitting the batch changes the
# rounding: fp16 keeps 11 significant bits, bf16 8 (measured ~1e-2 with bf16).
MIXED = {"mixed_float16": 1e-3, "mixed_bfloat16": 3e-2}


def check_mixed_precision(case, directory, reference, processes, infos):
    """One inf example: its step (one of 4 each epoch) is skipped on every rank and counted; the rest
    matches one device in the same precision."""
    for policy, tolerance in MIXED.items():
        assert all(i[f"{policy}_skipped"] == [0.25] * 5 and i[f"{policy}_steps"] == 15 for i in infos), (case, infos)
        ranks = [load(directory, policy, r) for r in range(processes)]
        for rank_weights in ranks[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(ranks[0], rank_weights)), f"{case}/{policy}: ranks differ"
        if reference is not None:
            rel = max(np.max(np.abs(g - w)) / np.max(np.abs(w)) for g, w in zip(ranks[0], load(reference, policy, 0)))
            assert rel <= tolerance, f"{case}/{policy}: relative difference {rel:.2e} from one device > {tolerance}"


@pytest.mark.timeout(TEST_TIMEOUT)
def test_one_device_accumulation_and_mixed_precision(reference):
    info = json.loads((reference / "info_rank0.json").read_text())
    check_mixed_precision("single", reference, None, 1, [info])
    for got, want in zip(load(reference, "accum", 0), load(reference, "adam", 0)):
        rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert rel <= 1e-5, f"single/accum: relative difference {rel:.2e} > 1e-5"
    # K steps per compiled call apply the same updates in the same order: bitwise on one device
    assert all(np.array_equal(a, b) for a, b in zip(load(reference, "spe", 0), load(reference, "adam", 0)))
    np.testing.assert_allclose(info["spe_loss"], info["adam_loss"], rtol=1e-6)


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_single_device(case, reference, tmp_path_factory):
    """The launcher's environment alone picks the backend (--backend auto)."""
    launcher = case
    expected_backend, replicas = CASES[case]
    tmp_path = job(launcher, "equivalence", tmp_path_factory).out
    processes = 1 if launcher == "mirrored" else 2
    infos = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in range(processes)]
    assert [i["rank"] for i in infos] == list(range(processes))
    assert all(i["backend"] == expected_backend and i["replicas"] == replicas for i in infos), infos
    if case == "horovod-mpi":
        assert all(i["mpi"] and not i["gloo"] for i in infos), infos
    if case == "horovod-gloo":
        assert all(i["gloo"] and not i["mpi"] for i in infos), infos
    assert all(i["clipped_fraction"][0] == 1.0 for i in infos), infos  # the clipping did act
    for optimizer in ("sgd", "adam", "two", "clip", "accum", "spe"):
        assert all(i[f"{optimizer}_steps"] == 20 for i in infos), infos
        expected = load(reference, "adam" if optimizer in ("accum", "spe") else optimizer, 0)
        ranks = [load(tmp_path, optimizer, r) for r in range(processes)]
        for rank_weights in ranks[1:]:  # bitwise identical across ranks
            for a, b in zip(ranks[0], rank_weights):
                assert np.array_equal(a, b), f"{case}/{optimizer}: ranks differ"
        for got, want in zip(ranks[0], expected):
            rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert rel <= 1e-5, f"{case}/{optimizer}: relative difference {rel:.2e} > 1e-5"
    check_compression(case, tmp_path, reference, processes, replicas)
    check_mixed_precision(case, tmp_path, reference, processes, infos)


def check_compression(case, tmp_path, reference, processes, replicas):
    for compression, wire in WIRE.items():
        arrays = {}
        for r in range(processes):
            with np.load(tmp_path / f"reduce_{compression}_rank{r}.npz") as f:
                arrays.update({k: f[k] for k in f.files})
        for k in range(3):
            local = [arrays[f"local{i}_{k}"] for i in range(replicas)]
            exact = local[0].dtype
            expected = sum(v.astype(wire or exact) for v in local[1:]) + local[0].astype(wire or exact)
            for i in range(replicas):
                got = arrays[f"reduced{i}_{k}"]
                assert got.dtype == exact, f"{case}/{compression}: reduced dtype {got.dtype}, sent {exact}"
                assert np.array_equal(got, expected.astype(exact)), \
                    f"{case}/{compression}: tensor {k} on replica {i} is not the sum taken in {compression}"
            if wire is not None:  # the compressed sum really differs from the exact one
                assert not np.array_equal(arrays[f"reduced0_{k}"], sum(local[1:]) + local[0]), (case, compression, k)
    for compression, (low, high) in COMPRESSED_TOLERANCE.items():
        name = f"sgd_{compression}"
        ranks = [load(tmp_path, name, r) for r in range(processes)]
        for rank_weights in ranks[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(ranks[0], rank_weights)), f"{case}/{name}: ranks differ"
        rel = max(np.max(np.abs(g - w)) / np.max(np.abs(w)) for g, w in zip(ranks[0], load(reference, "sgd", 0)))
        assert low < rel <= high, f"{case}/{name}: relative difference {rel:.2e} outside ({low}, {high}]"
