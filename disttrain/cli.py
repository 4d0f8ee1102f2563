"""The ``disttrain`` command: ``info`` and ``launch``."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def horovod_status() -> tuple[bool, str]:
    """``(usable, explanation)`` for the Horovod backend on this machine."""
    try:
        import horovod.tensorflow as hvd  # noqa: F401
        from horovod.common.util import gloo_built, mpi_built
    except ImportError as err:
        from disttrain.backends.horovod import SETUP_HINT
        return False, f"Horovod is not installed ({err}); {SETUP_HINT}"
    controllers = [name for name, built in (("MPI", mpi_built()), ("Gloo", gloo_built())) if built]
    missing = [name for name in ("MPI", "Gloo") if name not in controllers]
    note = f"controllers: {', '.join(controllers) or 'none'}"
    if missing:
        note += f" (built without {', '.join(missing)}; rebuild with scripts/build_horovod.sh)"
    if "MPI" in controllers and not shutil.which("mpirun"):
        note += "; mpirun is not on PATH (apt-get install openmpi-bin)"
    return bool(controllers), note


def info(out=sys.stdout) -> int:
    """Prints versions, devices and which backends can run here (and why not)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import keras

    from disttrain import __version__
    from disttrain.backends import detect

    w = lambda s="": print(s, file=out)  # noqa: E731
    w(f"disttrain   {__version__}")
    w(f"python      {sys.version.split()[0]}")
    w(f"tensorflow  {tf.__version__}")
    w(f"keras       {keras.__version__}")
    w(f"horovod     {_version('horovod') or 'not installed'}")
    cpus = tf.config.list_physical_devices("CPU")
    gpus = tf.config.list_physical_devices("GPU")
    w(f"devices     {len(cpus)} CPU, {len(gpus)} GPU" + "".join(f"\n            {d.name}" for d in gpus))
    hvd_ok, hvd_note = horovod_status()
    rows = [
        ("single", True, "always"),
        ("mirrored", True, f"{len(gpus)} GPU(s)" if len(gpus) > 1 else
         "on logical CPU devices (cpu_replicas=N); fewer than 2 GPUs visible"),
        ("multiworker", True, "needs TF_CONFIG (set by `disttrain launch --tf-config`, launch/ scripts or you)"),
        ("horovod", hvd_ok, hvd_note),
    ]
    w("backends")
    for name, ok, why in rows:
        w(f"  {name:<12} {'yes' if ok else 'NO '}  {why}")
    w(f"auto picks  {detect()}")
    return 0


def launch(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0].endswith(".py"):
        command = [sys.executable] + command
    if args.horovod:
        horovodrun = shutil.which("horovodrun")
        if not horovodrun:
            from disttrain.backends.horovod import SETUP_HINT
            print(f"disttrain launch: horovodrun not found; {SETUP_HINT}", file=sys.stderr)
            return 2
        return subprocess.call([horovodrun, "-np", str(args.num_workers), "--gloo"] + command)
    from disttrain.launch import launch_tf_config

    return launch_tf_config(command, num_workers=args.num_workers, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disttrain", description="distributed TF2 custom training loops")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices and usable backends")
    p = sub.add_parser("launch", help="run a training script as N local processes")
    p.add_argument("-n", "--num-workers", type=int, default=2)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tf-config", action="store_true", default=True,
                      help="MultiWorkerMirroredStrategy workers with TF_CONFIG on localhost (default)")
    mode.add_argument("--horovod", action="store_true", help="Horovod ranks via horovodrun --gloo")
    p.add_argument("--timeout", type=float, default=None, help="kill every worker after this many seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="script.py [args...]")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return info()
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
