"""``disttrain install-horovod``: build and install Horovod for this Python, from the installed package.

Horovod 0.28.1 ships as source only and needs a patch for TensorFlow >= 2.16; the recipe is the shell
script ``disttrain/scripts/build_horovod.sh`` inside this package (the checkout's
``scripts/build_horovod.sh`` and the Docker images run the same file). The wheel it builds is cached in
``~/.cache/disttrain/horovod`` so a second environment installs in seconds.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

#: What to do where Horovod is missing; named by every error about it.
INSTALL_HINT = ("install it with `disttrain install-horovod` (builds Horovod 0.28.1 for this Python once, "
                "about 8 minutes on 2 cores; needs g++ and make, plus OpenMPI's mpicxx for the MPI controller)")


def build_script() -> Path:
    """The packaged build script."""
    return Path(__file__).resolve().parent / "scripts" / "build_horovod.sh"


def install_horovod(*, python: str = sys.executable, gpu: bool = False, cache: str | None = None,
                    dry_run: bool = False) -> int:
    """Runs the packaged build script for ``python``; returns its exit code.

    Args:
      python: The interpreter whose environment gets Horovod (default: this one).
      gpu: Build Horovod's NCCL GPU operations (needs CUDA and NCCL).
      cache: Wheel cache directory (default ``~/.cache/disttrain``).
      dry_run: Only print the command.
    """
    env = dict(os.environ, DISTTRAIN_PYTHON=python)
    if gpu:
        env["DISTTRAIN_GPU"] = "1"
    if cache:
        env["DISTTRAIN_CACHE"] = cache
    command = ["bash", str(build_script())]
    shown = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("DISTTRAIN_PYTHON", "DISTTRAIN_GPU", "DISTTRAIN_CACHE")
                     if k in env)
    print(f"disttrain install-horovod: {shown} {shlex.join(command)}", file=sys.stderr, flush=True)
    if dry_run:
        return 0
    return subprocess.call(command, env=env)
