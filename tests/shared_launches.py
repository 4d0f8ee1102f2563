"""One launch per backend for every test that only reads what its worker wrote.

Starting TensorFlow and a backend costs 4-15 s a launch on these 2 cores (horovodrun alone imports
TensorFlow once more to check its Gloo build), so the workers of several test files run one after
another in ONE launch per backend (tests/workers/shared_runner.py): the collectives, the equivalence
trainings, the LR timelines, the data epochs, the observability run, the seed programs, the resumes of
checkpoints, damaged checkpoints and storage faults, the non-finite and the input-check cases. The backend comes from the launcher's environment
alone (``--backend auto``). Each job writes into its own directory and each rank's stdout of each job is
kept apart, so a test sees what it saw when its worker had a launch of its own. The launch runs when a
test first asks for one of its jobs.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

from launchers import EXAMPLES, WORKERS, run
from resume_runs import STOP_TIMEOUT, resume_args

#: Hard timeout of one backend's launch.
TIMEOUT = 900
#: pytest's timeout for a test that may start launches (two shared ones and the stopped runs the resume
#: jobs need): a backstop only, each launch has its own hard timeout.
TEST_TIMEOUT = 2 * TIMEOUT + 5 * STOP_TIMEOUT + 60
ALL = ("single", "mirrored", "multiworker", "horovod-gloo", "horovod-mpi")
DISTRIBUTED = ("mirrored", "multiworker", "horovod-gloo")

#: name -> (script, backends that run it, its arguments given its output directory, the backend and pytest's
#: tmp_path_factory). Run in this order; the jobs that raise on purpose come last.
JOBS = {
    "collectives": (WORKERS / "collectives.py", ("single",) + DISTRIBUTED, lambda out, *_: ["--out", str(out)]),
    "equivalence": (WORKERS / "equivalence.py", ALL, lambda out, *_: ["--out", str(out)]),
    "lr": (WORKERS / "lr_sync.py", ("single",) + DISTRIBUTED, lambda out, *_: ["--out", str(out)]),
    "data": (WORKERS / "data_epoch.py", DISTRIBUTED,
             lambda out, *_: ["--out", str(out), "--shards", str(out.parent / "shards")]),
    # multiworker creates TensorBoard/JsonLinesLogger on the chief only
    "obs": (WORKERS / "obs_train.py", DISTRIBUTED,
            lambda out, backend, _: ["--out", str(out)] + (["--chief-only-callbacks"] if backend == "multiworker" else [])),
    "seed": (WORKERS / "seed_examples.py", ("single",) + DISTRIBUTED, lambda out, *_: ["--out-dir", str(out)]),
    "digits": (EXAMPLES / "sharded_digits.py", ("horovod-gloo",),
               lambda out, *_: ["--history-json", str(out / "history.json"), "--data-dir", str(out / "data")]),
    # resumes the checkpoints of tests/test_checkpoint_resume.py's stopped runs (launched first)
    "resume": (WORKERS / "resume.py", ALL, resume_args),
    # damaged checkpoints, a full disk, a directory each rank sees differently (tests/test_checkpoint_damage*.py)
    "ckpt_damage": (WORKERS / "ckpt_damage.py", ("multiworker", "horovod-gloo"), lambda out, *_: ["--out", str(out)]),
    "nonfinite": (WORKERS / "nonfinite.py", ALL, lambda out, *_: ["--out", str(out)]),
    "checks": (WORKERS / "checks.py", DISTRIBUTED, lambda out, *_: ["--out", str(out)]),
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One job of a backend's launch: its output directory, each rank's stdout, and the launch."""

    out: Path
    stdout: list[str]
    launch: subprocess.CompletedProcess


_launches: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}


def rows(n: int, first: int = 0):
    """``n`` examples ``{"id", "x", "y"}`` with ids from ``first``."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(first)
    return tf.data.Dataset.from_tensor_slices(
        {"id": np.arange(first, first + n, dtype=np.int64), "x": rng.normal(size=(n, 3)).astype("float32"),
         "y": rng.normal(size=n).astype("float32")})


def write_data_shards(root: Path) -> None:
    """The data job's inputs (tests/workers/data_epoch.py): even, uneven and three-file shard sets."""
    from disttrain import shards as S

    S.write_shards(rows(37), root / "even", num_shards=4)  # 10, 9, 9, 9 examples
    a = S.write_shards(rows(20), root / "uneven", num_shards=2, prefix="a")  # ids 0-19: 10 + 10
    b = S.write_shards(rows(16, first=20), root / "uneven", num_shards=2, prefix="b")  # ids 20-35: 8 + 8
    # Pipeline 0 of 2 reads files 0 and 2 (a: 20 examples = 5 batches of 4), pipeline 1 files 1 and 3 (16 = 4).
    (root / "uneven_order.json").write_text(json.dumps([a[0], b[0], a[1], b[1]]))
    S.write_shards(rows(36), root / "three", num_shards=3)  # 12 + 12 + 12
    (root / "elements.json").write_text(json.dumps({"examples": 45}))


def job(backend: str, name: str, tmp_path_factory) -> Job:
    """Job ``name`` of ``backend``'s launch (which runs on first use); fails, with the launch's output,
    if that job did not finish on every rank."""
    if backend not in _launches:
        directory = tmp_path_factory.mktemp(f"shared-{backend}")
        names = [n for n, (_, backends, _) in JOBS.items() if backend in backends]
        if "data" in names:
            write_data_shards(directory / "shards")
        jobs = []
        for n in names:
            script, _, argv = JOBS[n]
            (directory / n).mkdir()
            try:
                args = argv(directory / n, backend, tmp_path_factory)
            except AssertionError:  # an input of this job failed (it fails that job's tests itself)
                continue
            jobs.append({"name": n, "script": str(script), "argv": args})
        if "obs" in names:
            (directory / "obs" / "work").mkdir()  # the observability run works (and must write nothing) there
        plan = directory / "plan.json"
        plan.write_text(json.dumps({"dir": str(directory), "jobs": jobs}))
        proc = run(backend, WORKERS / "shared_runner.py", ["--plan", str(plan)], timeout=TIMEOUT, auto=True,
                   returncode=None)
        _launches[backend] = directory, proc
    directory, proc = _launches[backend]
    processes = 1 if backend in ("single", "mirrored") else 2
    if not all((directory / f"{name}.done.rank{r}").exists() for r in range(processes)):
        raise AssertionError(f"{backend}: job {name} of the shared launch did not finish (exit {proc.returncode})"
                             f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    stdout = [(directory / f"{name}.stdout.rank{r}").read_text() for r in range(processes)]
    return Job(out=directory / name, stdout=stdout, launch=proc)
