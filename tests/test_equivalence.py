"""Same model, data, seed and 20 steps: every backend ends with the single-device weights.

Four trainings per launch: SGD, Adam, two models with two optimizers (SGD+momentum and Adam) updated
in one step, as in a GAN, and gradient clipping by the global norm (ctx.reduce_gradients).
"""

import pytest

from equivalence_check import SCRIPT, check
from launchers import run

# (launcher, expected backend, logical CPUs per process, replicas in sync)
CASES = {
    "mirrored": ("mirrored", None, 2),
    "multiworker": ("multiworker", None, 2),
    "horovod-gloo": ("horovod", None, 2),
    "horovod-mpi": ("horovod", None, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_single_device(case, equivalence_reference, tmp_path):
    """The launcher's environment alone picks the backend (--backend auto)."""
    launcher = case
    expected_backend, cpu_replicas, replicas = CASES[case]
    run(launcher, SCRIPT, ["--out", str(tmp_path)], timeout=240, auto=True, cpu_replicas=cpu_replicas)
    processes = 1 if launcher == "mirrored" else 2
    infos = check(case, tmp_path, equivalence_reference, processes=processes, backend=expected_backend,
                  replicas=replicas)
    if case == "horovod-mpi":
        assert all(i["mpi"] and not i["gloo"] for i in infos), infos
    if case == "horovod-gloo":
        assert all(i["gloo"] and not i["mpi"] for i in infos), infos
