"""The stopped runs of tests/test_checkpoint_resume.py, and the arguments of their resumes (a job of each
backend's shared launch, tests/shared_launches.py): see that test's docstring."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from launchers import WORKERS, run

SCRIPT = WORKERS / "resume.py"
BACKENDS = ["single", "mirrored", "horovod-gloo", "horovod-mpi", "multiworker"]
SIGNALLED_RANK = {"single": 0, "mirrored": 0}  # the others: rank 1 of 2 processes
PROCESSES = {"single": 1, "mirrored": 1}
# horovodrun reports a worker's status in its message and exits 1 itself; the others pass it on.
LAUNCHER_STATUS = {"horovod-gloo": 1}
#: backend -> the backends whose checkpoints its resume launch also resumes
CROSS = {"single": ["horovod-gloo"], "mirrored": ["horovod-gloo"], "multiworker": ["horovod-gloo"],
         "horovod-gloo": ["single", "mirrored", "multiworker"], "horovod-mpi": []}

STOP_TIMEOUT = 300  # hard timeout of a stopped run's launch
_stopped: dict = {}


def stopped(backend, tmp_path_factory):
    """The stopped run of ``backend`` (launched once): ``(directory, process, end time)``."""
    if backend not in _stopped:
        out = tmp_path_factory.mktemp(f"stop-{backend}")
        try:
            proc = run(backend, SCRIPT, ["--out", str(out), "--stop", str(out / "ckpt"), "--sigterm-rank",
                                         str(SIGNALLED_RANK.get(backend, 1)), "--sigterm-step", "13"],
                       timeout=STOP_TIMEOUT, returncode=LAUNCHER_STATUS.get(backend, 42))
            _stopped[backend] = (out, proc, time.time())
            shutil.copytree(out / "ckpt", out / "pristine")  # as the stop left it: for the checks and other backends
        except Exception as err:  # noqa: BLE001 - re-raised for every test that needs this run
            _stopped[backend] = err
    if isinstance(_stopped[backend], Exception):
        raise AssertionError(f"the stopped run of {backend} failed") from _stopped[backend]
    return _stopped[backend]


def resume_args(out: Path, backend: str, tmp_path_factory) -> list[str]:
    """The resume worker's arguments: ``backend``'s own checkpoint and copies of those of ``CROSS[backend]``
    (their stopped runs are launched first if they have not run yet)."""
    own, _, _ = stopped(backend, tmp_path_factory)
    resumes = [f"own={own / 'ckpt'}"]
    for writer in CROSS[backend]:
        directory, _, _ = stopped(writer, tmp_path_factory)
        shutil.copytree(directory / "pristine", out / writer)
        resumes.append(f"{writer}={out / writer}")
    return ["--out", str(out)] + [a for r in resumes for a in ("--resume", r)]
