"""The ``disttrain`` command: ``info``, ``doctor``, ``launch``, ``run``, ``install-horovod`` and ``slurm``.

Nothing heavy is imported before a subcommand needs it: ``disttrain --help`` answers without loading
TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys

from disttrain import startup_logs
from disttrain.launcher import DEFAULT_SSH


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
        from disttrain.install import INSTALL_HINT
        return False, f"Horovod is not installed ({err}); {INSTALL_HINT}"
    controllers = [name for name, built in (("MPI", mpi_built()), ("Gloo", gloo_built())) if built]
    missing = [name for name in ("MPI", "Gloo") if name not in controllers]
    note = f"controllers: {', '.join(controllers) or 'none'}"
    if missing:
        note += f" (built without {', '.join(missing)}; rebuild with `disttrain install-horovod`)"
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
        ("multiworker", True, "needs TF_CONFIG (set by `disttrain launch`, launch/ scripts or you) or mpirun + mpi4py"),
        ("horovod", hvd_ok, hvd_note),
    ]
    w("backends")
    for name, ok, why in rows:
        w(f"  {name:<12} {'yes' if ok else 'NO '}  {why}")
    w(f"auto picks  {detect()}")
    return 0


def _launch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from disttrain.launcher import launch
    from disttrain.launcher.hosts import Host, parse_hosts, read_hostfile

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("the training script is missing: disttrain launch [options] script.py [args ...]")
    if command[0].endswith(".py"):
        if not os.path.isfile(command[0]):
            parser.error(f"script {command[0]!r} does not exist (looked in {os.getcwd()})")
        command = [sys.executable] + command
    elastic = args.min_workers is not None or args.max_workers is not None or args.host_discovery_script
    try:
        hosts = (parse_hosts(args.hosts) if args.hosts else read_hostfile(args.hostfile) if args.hostfile
                 else None if args.host_discovery_script
                 else [Host("localhost", (args.max_workers or 2) if elastic else (args.num_workers or 2))])
    except (ValueError, OSError) as err:
        parser.error(str(err))
    num_workers = args.num_workers if elastic else args.num_workers or sum(h.slots for h in hosts)
    if args.verbose:
        startup_logs.make_verbose()
    try:
        return launch(command, backend=args.backend, hosts=hosts, num_workers=num_workers,
                      max_restarts=args.max_restarts, grace_period=args.grace_period, stop_timeout=args.stop_timeout,
                      timeout=args.timeout, startup_timeout=args.startup_timeout, ssh=args.ssh,
                      min_workers=args.min_workers, max_workers=args.max_workers,
                      discovery_script=args.host_discovery_script, discovery_interval=args.discovery_interval,
                      elastic_timeout=args.elastic_timeout)
    except (ValueError, ImportError, RuntimeError) as err:
        print(f"disttrain launch: {err}", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from disttrain.launcher.outcome import run

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("the launcher is missing: disttrain run [--status-dir DIR] -- mpirun -np 2 python train.py")
    if args.verbose:
        startup_logs.make_verbose()
    try:
        return run(command, status_dir=args.status_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"disttrain run: {err}", file=sys.stderr)
        return 127 if isinstance(err, FileNotFoundError) else 2


def _install_horovod(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from disttrain.install import install_horovod

    return install_horovod(gpu=args.gpu, cache=args.cache, dry_run=args.dry_run)


def _doctor(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from disttrain.doctor import Doctor

    return Doctor(steps=args.steps, per_gpu_batch=args.batch_per_gpu, simulate_gpus=args.simulate_gpus).run()


def _slurm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from disttrain.launcher import slurm

    try:
        if args.what == "tf-config":
            print(slurm.tf_config(port=args.port))
        else:
            print(slurm.horovod_hosts())
    except (KeyError, ValueError) as err:
        parser.error(str(err))
    return 0


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative; give a value >= 0")
        return value
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disttrain", description="Distributed TensorFlow 2 custom training loops.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version('disttrain') or 'dev'}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("info", help="versions, devices and which backends can run here",
                   description="Print versions, devices and which backends can run here (and why not).")

    p = sub.add_parser("launch", help="run a training script as N workers, here or on several hosts",
                       description="Run a training script as N workers (MultiWorkerMirrored with TF_CONFIG, or "
                                   "Horovod ranks with Gloo), on this machine or on hosts reached by ssh. Watches "
                                   "every worker: one failing stops the others; SIGTERM/SIGINT are forwarded. "
                                   "Prints the exact command of each worker. See docs/launch.md.")
    p.add_argument("-n", "--num-workers", type=int, default=None, metavar="N",
                   help="number of workers (default: the slots of -H/--hostfile, else 2)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-H", "--hosts", metavar="HOST:SLOTS,...",
                       help="hosts and their worker slots, e.g. host1:2,host2:2 (default: localhost)")
    where.add_argument("--hostfile", metavar="FILE", help="file with one 'host slots=N' (or host:N) line per host")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--backend", choices=("multiworker", "horovod"), default="multiworker",
                      help="multiworker: TF_CONFIG per worker (default); horovod: Horovod ranks with Gloo")
    mode.add_argument("--tf-config", dest="backend", action="store_const", const="multiworker",
                      help="same as --backend multiworker")
    mode.add_argument("--horovod", dest="backend", action="store_const", const="horovod",
                      help="same as --backend horovod")
    p.add_argument("--max-restarts", type=_positive(int), default=0, metavar="N",
                   help="after a worker fails, restart all workers up to N times; they resume from their last "
                        "checkpoint (default 0)")
    p.add_argument("--grace-period", type=_positive(float), default=60.0, metavar="S",
                   help="seconds between forwarding SIGTERM/SIGINT to the workers (or one exiting preempted) and "
                        "SIGKILL, for the preemption checkpoint (default 60)")
    p.add_argument("--stop-timeout", type=_positive(float), default=5.0, metavar="S",
                   help="after one worker failed: seconds between SIGTERM and SIGKILL for the others (default 5)")
    p.add_argument("--startup-timeout", type=_positive(float), default=None, metavar="S",
                   help="seconds a worker waits for its peers at start-up before it fails naming the missing ones "
                        "(sets DISTTRAIN_STARTUP_TIMEOUT; default 300)")
    p.add_argument("--timeout", type=_positive(float), default=None, metavar="S",
                   help="stop every worker after S seconds in all and exit with 124 (default: no limit)")
    p.add_argument("--verbose", action="store_true",
                   help="keep TensorFlow's start-up notices and C++ INFO/WARNING lines (sets DISTTRAIN_VERBOSE=1 "
                        "for the workers)")
    elastic = p.add_argument_group("elastic jobs (workers leave and join; see docs/elastic.md)")
    elastic.add_argument("--min-workers", type=_positive(int), default=None, metavar="M",
                         help="elastic: run with at least M workers (default 1 when elastic)")
    elastic.add_argument("--max-workers", type=_positive(int), default=None, metavar="N",
                         help="elastic: run with at most N workers (default: every usable slot)")
    elastic.add_argument("--host-discovery-script", metavar="COMMAND", default=None,
                         help="elastic: a command printing the available hosts as host:slots lines (as horovodrun's), "
                              "run every --discovery-interval seconds; instead of -H/--hostfile")
    elastic.add_argument("--discovery-interval", type=_positive(float), default=2.0, metavar="S",
                         help="seconds between two runs of the discovery script (default 2)")
    elastic.add_argument("--elastic-timeout", type=_positive(float), default=300.0, metavar="S",
                         help="end the job (exit 75) after S seconds with fewer than --min-workers usable slots "
                              "(default 300)")
    p.add_argument("--ssh", default=DEFAULT_SSH, metavar="COMMAND",
                   help=f"remote shell for other hosts (default: {DEFAULT_SSH!r})")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="script.py [args ...]",
                   help="the training script (run with this Python) or any command, and its arguments")
    p.set_defaults(run=_launch, subparser=p)

    p = sub.add_parser("run", help="run horovodrun, mpirun or srun and exit 42 when every rank was preempted",
                       description="Run a launcher (horovodrun, mpirun, srun, ...) and exit with a code a scheduler "
                                   "can use: 42 when every rank was preempted and saved its checkpoint, else the "
                                   "code of the first rank that failed, else the launcher's own. Each disttrain "
                                   "process records its exit status in a directory given to it in "
                                   "DISTTRAIN_STATUS_DIR. Prints one line saying which. See docs/launch.md.")
    p.add_argument("--status-dir", metavar="DIR", default=None,
                   help="where the ranks write their status; must be on a filesystem every host shares when "
                        "ranks run on other hosts (default: a new temporary directory here)")
    p.add_argument("--verbose", action="store_true",
                   help="keep TensorFlow's start-up notices and C++ INFO/WARNING lines (sets DISTTRAIN_VERBOSE=1 "
                        "for the workers)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- LAUNCHER [args ...]",
                   help="the launcher command, e.g. -- mpirun -np 2 python train.py")
    p.set_defaults(run=_run, subparser=p)

    p = sub.add_parser("install-horovod", help="build and install Horovod for this Python (cached)",
                       description="Build Horovod 0.28.1 from source for this Python and TensorFlow (patched for "
                                   "TF >= 2.16) and install it; the wheel is cached, so later installs take seconds.")
    p.add_argument("--gpu", action="store_true", help="build NCCL GPU operations (needs CUDA and NCCL)")
    p.add_argument("--cache", metavar="DIR", default=None, help="wheel cache (default ~/.cache/disttrain)")
    p.add_argument("--dry-run", action="store_true", help="print the build command without running it")
    p.set_defaults(run=_install_horovod, subparser=p)

    p = sub.add_parser("doctor", help="check this GPU host: versions, NCCL, a short real job (CPU parts without GPU)",
                       description="Check a GPU host: the GPUs TensorFlow sees, CUDA/cuDNN/NCCL, Horovod built with "
                                   "NCCL, then Mirrored and horovodrun -np <GPUs> matching one GPU, mixed_float16 and "
                                   "a throughput figure. Stops with exit code 1 at the first failure. Without a GPU: "
                                   "the CPU parts, then exit 0. See docs/gpu.md.")
    p.add_argument("--steps", type=int, default=30, metavar="N", help="timed steps of each throughput figure (default 30)")
    p.add_argument("--batch-per-gpu", type=int, default=64, metavar="N", help="images per GPU per step (default 64)")
    p.add_argument("--simulate-gpus", type=int, default=0, metavar="N",
                   help="on a machine without GPUs: run the GPU checks on N logical CPU devices / CPU ranks")
    p.set_defaults(run=_doctor, subparser=p)

    p = sub.add_parser("slurm", help="TF_CONFIG or a Horovod host list from SLURM's variables",
                       description="Inside a SLURM job step: print this task's TF_CONFIG, or the host list "
                                   "host1:N,host2:N of the step for horovodrun -H. Used by launch/*.sbatch.")
    p.add_argument("what", choices=("tf-config", "hosts"), help="tf-config: this task's TF_CONFIG; hosts: -H list")
    p.add_argument("--port", type=int, default=12345, metavar="PORT",
                   help="first port of the workers on each node; the i-th task of a node uses PORT+i (default 12345)")
    p.set_defaults(run=_slurm, subparser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return info()
    return args.run(args.subparser, args)


if __name__ == "__main__":
    sys.exit(main())
