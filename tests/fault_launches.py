"""One launch per backend for the non-finite and the input-check workers, shared by tests/test_nonfinite.py
and tests/test_input_checks.py: on the backends both cover, tests/workers/faults_in_one.py runs both
workers' cases in one process (one TensorFlow start-up, one backend), which saves a launch each."""

from __future__ import annotations

import subprocess
from pathlib import Path

from launchers import WORKERS, run

#: Backends whose launch runs both workers.
BOTH = ("mirrored", "multiworker", "horovod-gloo")
#: Hard timeout of one launch (the tests' own pytest timeout is above it).
TIMEOUT = 420
_launches: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}


def launch(backend: str, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``(output directory, finished launch)`` of ``backend``'s one launch (run on first use)."""
    if backend not in _launches:
        out = tmp_path_factory.mktemp(f"faults-{backend}")
        script = "faults_in_one.py" if backend in BOTH else "nonfinite.py"
        _launches[backend] = out, run(backend, WORKERS / script, ["--out", str(out)], timeout=TIMEOUT)
    return _launches[backend]
