"""Run a worker script under each backend's real launcher, with a hard timeout, for the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent

#: (name, launcher) pairs every cross-backend test runs over; the mpirun row needs OpenMPI.
#: ("multiworker-mpi", MultiWorker under mpirun, is an extra launcher of tests/test_multihost.py.)
BACKENDS = ["single", "mirrored", "multiworker", "horovod-gloo", "horovod-mpi"]


#: What base_env() sets that a user's environment does not: a run without them shows whether disttrain
#: keeps TensorFlow's start-up notices out of the output (disttrain/startup_logs.py).
TEST_ONLY_ENV = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")


def startup_notices(output: str) -> list[str]:
    """The lines of ``output`` that are TensorFlow's start-up notices (absl, oneDNN, CPU features)."""
    from disttrain.startup_logs import NOTICES

    return [line for line in output.splitlines()
            if any(n.decode() in line for n in NOTICES) or "cpu_feature_guard" in line]


def base_env() -> dict:
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", DISTTRAIN_THREADS="1", OMP_NUM_THREADS="1",
               TF_ENABLE_ONEDNN_OPTS="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(EXAMPLES), env.get("PYTHONPATH", "")]))
    for key in [k for k in env if k.startswith(("OMPI_", "PMIX_", "HOROVOD_")) or k == "TF_CONFIG"]:
        del env[key]
    return env


def command_for(backend: str, script: Path | str, args: list[str], *, np: int = 2, auto: bool = False,
                cpu_replicas: int | None = None) -> tuple[list[str], dict]:
    """The command line that runs ``script`` under ``backend`` with ``np`` processes/replicas.

    With ``auto`` the script is told ``--backend auto`` and must detect the backend from the launcher.
    ``cpu_replicas`` gives each multiworker process that many logical CPU devices.
    """
    py = [sys.executable, str(script)]
    env = base_env()

    def name(explicit: str) -> list[str]:
        return ["--backend", "auto" if auto else explicit]

    if backend == "single":
        return py + name("single") + args, env
    if backend == "mirrored":
        if auto:
            env["DISTTRAIN_CPU_REPLICAS"] = str(np)
            return py + name("mirrored") + args, env
        return py + name("mirrored") + ["--cpu-replicas", str(np)] + args, env
    if backend == "multiworker":
        extra = ["--cpu-replicas", str(cpu_replicas)] if cpu_replicas else []
        return [str(BIN / "disttrain"), "launch", "--tf-config", "-n", str(np), "--"] + py + \
            name("multiworker") + extra + args, env
    if backend == "horovod-gloo":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"] + py + \
            name("horovod") + args, env
    if backend in ("horovod-mpi", "multiworker-mpi"):  # multiworker-mpi: TF_CONFIG formed with mpi4py
        mpirun = shutil.which("mpirun") or "mpirun"
        exports = []
        for key in ("TF_CPP_MIN_LOG_LEVEL", "DISTTRAIN_THREADS", "OMP_NUM_THREADS", "TF_ENABLE_ONEDNN_OPTS",
                    "PYTHONUNBUFFERED", "PYTHONPATH", "PATH"):
            exports += ["-x", key]
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_btl_vader_single_copy_mechanism="none")
        return [mpirun, "-np", str(np), "--oversubscribe", "--bind-to", "none"] + exports + py + \
            name(backend.split("-")[0]) + args, env
    raise ValueError(backend)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): horovodrun starts its workers in their own sessions,
    so killing the launcher's process group alone would leave hung workers behind."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    for child in _descendants(pid) if os.path.isdir("/proc") else []:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(pid, signal.SIGKILL)


def run(backend: str, script: Path | str, args: list[str] = (), *, np: int = 2, timeout: float = 180,
        extra_env: dict | None = None, auto: bool = False, cpu_replicas: int | None = None,
        returncode: int | None = 0, under_run: bool = False) -> subprocess.CompletedProcess:
    """Runs and returns the finished process; raises AssertionError on a timeout or an exit status other
    than ``returncode`` (None accepts any). A None value in ``extra_env`` unsets that variable;
    ``under_run`` runs the launcher under `disttrain run --`."""
    cmd, env = command_for(backend, script, list(args), np=np, auto=auto, cpu_replicas=cpu_replicas)
    if under_run:
        cmd = [str(BIN / "disttrain"), "run", "--"] + cmd
    for key, value in (extra_env or {}).items():  # None: unset
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)  # the launcher and every worker it started
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{backend}: {' '.join(cmd)} timed out after {timeout}s (a hang)\n"
                             f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}") from None
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if returncode is not None and proc.returncode != returncode:
        raise AssertionError(f"{backend}: exit {proc.returncode} (expected {returncode}): {' '.join(cmd)}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc
