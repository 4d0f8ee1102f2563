"""One process per device, gradients all-reduced by Horovod (MPI, Gloo or NCCL)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable

import tensorflow as tf

from disttrain.backends import reachability, thread_priority
from disttrain.backends.base import Backend, InputContext
from disttrain.backends.devices import horovod_gpu_operations, local_gpu_index
from disttrain.backends.failures import CollectiveFailure
from disttrain.backends.rendezvous import startup_timeout as _startup_timeout
from disttrain.backends.rendezvous import under_mpi, wait_for_horovod_peers
from disttrain.install import INSTALL_HINT as SETUP_HINT
from disttrain.watchdog import TIMEOUT_ENV


def import_horovod():
    """Imports ``horovod.tensorflow`` or raises an ImportError that says how to get it."""
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:
        raise ImportError(f"the horovod backend needs Horovod with TensorFlow support, which is not "
                          f"installed here ({err}); {SETUP_HINT}") from err
    return hvd


def stall_check_env(environ: dict) -> dict[str, str]:
    """Horovod's stall inspector settings derived from disttrain's watchdog timeout, unless the user set
    them: ``HOROVOD_STALL_CHECK_TIME_SECONDS`` = a quarter of ``DISTTRAIN_STEP_TIMEOUT`` (at least 1), so
    Horovod names the ranks missing from a collective before the watchdog aborts: for a tensor in its
    response cache (every step after the first) it needs two to three check periods (MPI controller
    only: see :meth:`HorovodBackend.stall_hint`)."""
    raw = environ.get(TIMEOUT_ENV, "").strip()
    if not raw or "HOROVOD_STALL_CHECK_TIME_SECONDS" in environ:
        return {}
    try:
        seconds = float(raw)
    except ValueError:
        return {}  # the trainer reports the bad value
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, int(seconds / 4)))} if seconds > 0 else {}


def horovod_env(*, fusion_threshold_mb: float | None = None, cycle_time_ms: float | None = None) -> dict[str, str]:
    """The environment variables Horovod reads at ``hvd.init()`` for these settings (None = unset).

    Raises:
      ValueError: For a negative fusion threshold or a non-positive cycle time.
    """
    env = {}
    if fusion_threshold_mb is not None:
        if fusion_threshold_mb < 0:
            raise ValueError(f"fusion_threshold_mb={fusion_threshold_mb} must be >= 0 (0 turns tensor fusion off)")
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(fusion_threshold_mb * (1 << 20)))
    if cycle_time_ms is not None:
        if not cycle_time_ms > 0:
            raise ValueError(f"cycle_time_ms={cycle_time_ms} must be > 0 (Horovod's default is 1)")
        env["HOROVOD_CYCLE_TIME"] = str(float(cycle_time_ms))
    return env


#: What Horovod's errors say when a collective failed (Gloo's own words are in Horovod's log line before).
#: Words of Horovod's and Gloo's own errors for a lost peer (not just "gloo": a path may hold that).
_LOST = ("Horovod has been shut down", "gloo/transport", "gloo::", "Gloo")


def describe_horovod_failure(err: BaseException, *, rank: int, size: int, hosts: dict[int, str], controller: str,
                             probe_port: int | None, probe=reachability.probe) -> CollectiveFailure | None:
    """Reads a Horovod error (see :meth:`HorovodBackend.describe_collective_failure`).

    Args:
      hosts: Every rank's host, from the start-up rendezvous (``{}`` under mpirun: unknown).
      controller: ``Gloo`` or ``MPI``.
      probe_port: The port probed on the peers' hosts (the Gloo rendezvous port: it accepts on the
        launcher's host and is refused elsewhere; either answer shows the host is reachable).
    """
    text = str(err)
    if not any(word in text for word in _LOST):
        return None
    if controller == "Gloo":
        limit = os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS", "30")
        summary = ("Horovod shut down after a Gloo collective failed (Gloo's own error is in Horovod's log line "
                   "'Horovod background loop uncaught exception' above: 'Timed out waiting ...ms' when a peer "
                   f"stopped answering for HOROVOD_GLOO_TIMEOUT_SECONDS={limit} s, 'Connection closed by peer' "
                   "when it died)")
    else:
        summary = ("Horovod shut down after an MPI collective failed (a rank that dies usually makes mpirun end "
                   "the job, naming it)")
    own = hosts.get(rank, "")
    others = [r for r in range(size) if r != rank]
    remote = sorted({hosts[r] for r in others if r in hosts and hosts[r] != own})
    verdicts = dict(zip(remote, probe([(h, probe_port) for h in remote]))) if remote and probe_port else {}
    down = [h for h, v in verdicts.items() if not v.reachable]
    if down:
        on = {h: [str(r) for r in others if hosts.get(r) == h] for h in down}
        peers = tuple(f"rank{'s' if len(on[h]) > 1 else ''} {', '.join(on[h])} on {h}: {verdicts[h].describe()}"
                      for h in down)
        return CollectiveFailure(summary=summary, peers=peers,
                                 next_step=f"check the network between {own} and {', '.join(down)} "
                                           "(and that those hosts are up)")
    if len(others) == 1:  # the one other rank is the lost one; its host answers, so the process itself is gone
        r = others[0]
        where = f" on {hosts[r]}" if r in hosts else ""
        how = (f"its host answers a probe ({verdicts[hosts[r]].describe()}), so its process died, stopped or hung"
               if r in hosts and hosts[r] in verdicts else
               "it runs on this host, so its process died, stopped or hung" if hosts.get(r) == own else
               "its host is not known under mpirun" if r not in hosts else "its host was not probed")
        return CollectiveFailure(summary=summary, peers=(f"rank {r}{where} (the only other rank; {how})",),
                                 next_step=f"see rank {r}'s log for its own error")
    why = ("every peer's host answers a probe and Horovod does not say which rank failed (its log above may)"
           if hosts else "the ranks' hosts are not known under mpirun; mpirun's own message names a rank it lost")
    return CollectiveFailure(summary=summary, unknown_why=why, next_step="see the other ranks' logs for the first error")


#: The watchdog's default under the MPI controller: OpenMPI waits for a stopped or partitioned peer forever.
MPI_STEP_TIMEOUT = 1800.0


def _raw(variable: Any) -> tf.Variable:
    return variable if isinstance(variable, tf.Variable) else getattr(variable, "value", variable)


class HorovodBackend(Backend):
    """Data parallelism with one replica per process; launch with ``horovodrun -np N`` or ``mpirun``.

    The gradients of every step are summed with grouped all-reduces (one per bucket, see
    :mod:`disttrain.backends.gradients`), and the model and optimizer variables are broadcast from rank 0
    before the first step (``sync_initial_state``).

    Horovod's background thread fuses the tensors that are ready within one cycle into one buffer of
    at most the fusion threshold; both are read once, when Horovod starts (here), from
    ``HOROVOD_FUSION_THRESHOLD`` (bytes) and ``HOROVOD_CYCLE_TIME`` (ms), which ``horovodrun
    --fusion-threshold-mb/--cycle-time-ms`` also set. The arguments below override them.

    Ranks started with Gloo first meet in the launcher's rendezvous server, so a rank that never comes is
    named within ``startup_timeout`` seconds (and SIGTERM ends that wait). Started by plain ``python``
    (no horovodrun, mpirun or ``disttrain launch``), it warns that it runs one process.

    Args:
      fusion_threshold_mb: Tensor fusion buffer in MiB (Horovod's default 128; 0 turns fusion off).
      cycle_time_ms: Milliseconds the background thread waits between fusion cycles (Horovod's
        default 1; larger fuses more, smaller lowers latency). Unset here and in
        ``HOROVOD_CYCLE_TIME``, it is 0.5 where the threads will run idle (the choice below).
      startup_timeout: Seconds to wait for the other ranks (default DISTTRAIN_STARTUP_TIMEOUT or 300).
      communication_priority: ``idle`` runs Horovod's threads (its background thread and Gloo's) at
        Linux's ``SCHED_IDLE``, so they take a core only when compute leaves one free (see
        :mod:`disttrain.backends.thread_priority`); ``normal`` leaves them as Horovod starts them;
        ``auto`` (the default, or ``DISTTRAIN_COMM_PRIORITY``) is ``idle`` when this rank has no GPU,
        every rank runs on this host and the controller is Gloo (horovodrun), else ``normal``.

    Raises:
      ImportError: If Horovod is not installed; the message names the install command.
      ValueError: For a negative fusion threshold or a non-positive cycle time, a communication priority
        other than auto, normal or idle, or a host with several GPUs but fewer than its processes (two
        would share one).
      TimeoutError: If a rank does not reach the rendezvous in time.
    """

    name = "horovod"

    def __init__(self, *, fusion_threshold_mb: float | None = None, cycle_time_ms: float | None = None,
                 startup_timeout: float | None = None, communication_priority: str | None = None):
        hvd = import_horovod()
        self._hvd = hvd
        priority = thread_priority.resolve(communication_priority)
        gpus = tf.config.list_physical_devices("GPU")
        if (cycle_time_ms is None and "HOROVOD_CYCLE_TIME" not in os.environ and not hvd.is_initialized()
                and (priority == "idle" or priority == "auto" and
                     thread_priority.auto_idle_before_init(num_gpus=len(gpus)))):
            cycle_time_ms = thread_priority.IDLE_CYCLE_TIME_MS  # idle threads: a shorter cycle costs nothing
        env = horovod_env(fusion_threshold_mb=fusion_threshold_mb, cycle_time_ms=cycle_time_ms)
        if env and hvd.is_initialized():
            raise ValueError(f"Horovod is already initialised; {env} can only be set before hvd.init(): "
                             "create the backend first thing in the program")
        os.environ.update(env)
        os.environ.update(stall_check_env(os.environ))  # read by hvd.init()
        if "HOROVOD_RANK" not in os.environ and not under_mpi():
            sys.stderr.write("disttrain: warning: the horovod backend was started without horovodrun, mpirun or "
                             "`disttrain launch --backend horovod`, so it runs ONE process (rank 0 of 1); launch "
                             "it with e.g. `horovodrun -np 2 python script.py`\n")
            sys.stderr.flush()
        self._hosts = wait_for_horovod_peers(timeout=_startup_timeout(startup_timeout))
        with thread_priority.started_threads() as started:
            hvd.init()
        if priority == "auto":
            # with a GPU the threads move device memory, not the compute's cores: normal, nothing to ask
            idle = not gpus and thread_priority.auto_idle(num_gpus=0, size=hvd.size(), local_size=hvd.local_size(),
                                                          gloo=bool(hvd.gloo_enabled()))
            priority = "idle" if idle else "normal"
        if priority == "idle":
            refused = thread_priority.set_idle(started)
            if refused:
                priority = "normal"
                if hvd.rank() == 0:
                    sys.stderr.write("disttrain: warning: Horovod's threads keep their priority "
                                     f"({'; '.join(refused)})\n")
        #: ``idle`` or ``normal``: what Horovod's threads run at in this process.
        self.communication_priority = priority
        if gpus:  # one GPU per process, picked by local rank
            gpu = gpus[local_gpu_index(local_rank=hvd.local_rank(), num_gpus=len(gpus))]
            try:
                tf.config.set_visible_devices(gpu, "GPU")
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass
            _, warning = horovod_gpu_operations(num_gpus=len(gpus), nccl_built=bool(hvd.nccl_built()))
            if warning and hvd.rank() == 0:
                sys.stderr.write(f"disttrain: warning: {warning}\n")
        self._ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}

    @property
    def rank(self) -> int:
        return self._hvd.rank()

    @property
    def size(self) -> int:
        return self._hvd.size()

    @property
    def local_rank(self) -> int:
        return self._hvd.local_rank()

    @property
    def local_replicas(self) -> int:
        return 1

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sync_initial_state(self, variables: list) -> None:
        if self.size > 1 and variables:
            self._hvd.broadcast_variables([_raw(v) for v in variables], root_rank=0)

    # -- the step ------------------------------------------------------------------------------
    def run(self, fn: Callable, args: tuple = ()) -> Any:
        return fn(*args)

    def local_values(self, per_replica: Any) -> tuple:
        return (per_replica,)

    def replica_id(self) -> int:
        return self.rank

    def _sum_gradients(self, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
        narrow = [i for i, t in enumerate(tensors) if t.dtype == tf.bfloat16]
        if not narrow:
            return self._hvd.grouped_allreduce(tensors, op=self._hvd.Sum)
        out = list(tensors)
        rest = [i for i in range(len(tensors)) if i not in narrow]
        if rest:
            for i, value in zip(rest, self._hvd.grouped_allreduce([tensors[i] for i in rest], op=self._hvd.Sum)):
                out[i] = value
        for i, value in zip(narrow, self._sum_bfloat16([tensors[i] for i in narrow])):
            out[i] = value
        return out

    def _sum_bfloat16(self, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
        """Horovod 0.28's allreduce has no bfloat16: gather every rank's bf16 bits (carried as float16,
        same width, never computed on) and add them in rank order, so every rank gets the same sum.
        With 2 ranks this moves the same bytes as a ring all-reduce; with more it moves more."""
        flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)
        gathered = self._hvd.allgather(tf.bitcast(flat, tf.float16))
        per_rank = tf.bitcast(tf.reshape(gathered, [self.size, -1]), tf.bfloat16)
        total = per_rank[0]
        for r in range(1, self.size):
            total = total + per_rank[r]
        parts = tf.split(total, tf.stack([tf.size(t) for t in tensors]), num=len(tensors))
        return [tf.reshape(part, tf.shape(t)) for part, t in zip(parts, tensors)]

    # -- collectives ---------------------------------------------------------------------------
    def _all_reduce_tensor(self, value: tf.Tensor, op: str) -> tf.Tensor:
        if value.dtype.is_bool:
            return tf.cast(self._hvd.allreduce(tf.cast(value, tf.int32), op=self._ops[op]), tf.bool)
        return self._hvd.allreduce(value, op=self._ops[op])

    def _broadcast_tensor(self, value: tf.Tensor, root: int) -> tf.Tensor:
        return self._hvd.broadcast(value, root_rank=root)

    def stall_hint(self) -> str:
        # Horovod 0.28.1's Gloo controller never fills the rank list its stall inspector loops over
        # (gloo_controller.cc: global_ranks_.reserve(size_) then writes through data(), so size() stays 0),
        # so "Missing ranks" is printed under mpirun / horovodrun --mpi only.
        return ("Horovod's own stall inspector (HOROVOD_STALL_CHECK_TIME_SECONDS, printed by rank 0) names the ranks "
                "missing from a collective under mpirun or horovodrun --mpi; Horovod 0.28.1 under Gloo "
                "(horovodrun --gloo) never prints it.")

    @property
    def default_step_timeout(self) -> float | None:
        """:data:`MPI_STEP_TIMEOUT` under the MPI controller (mpirun): MPI collectives never time out, so a
        peer that stops answering without dying would hold the others forever; under Gloo None (Gloo's own
        timeout, HOROVOD_GLOO_TIMEOUT_SECONDS, ends such a wait)."""
        return None if self._hvd.gloo_enabled() else MPI_STEP_TIMEOUT

    def describe_collective_failure(self, err: BaseException) -> CollectiveFailure | None:
        """Horovod's error after its background thread stopped on a failed collective ("Horovod has been
        shut down"; Gloo's own words go to the log): the peers' hosts (from the start-up rendezvous) are
        probed, so a host that cannot be reached is named; with two ranks the other one is the lost one."""
        port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT", "")
        return describe_horovod_failure(err, rank=self.rank, size=self.size, hosts=self._hosts,
                                        controller="Gloo" if self._hvd.gloo_enabled() else "MPI",
                                        probe_port=int(port) if port.isdigit() else None)

    # -- input ---------------------------------------------------------------------------------
    def distribute_dataset(self, dataset_fn: Callable[[InputContext], tf.data.Dataset], *,
                           global_batch_size: int) -> tf.data.Dataset:
        return dataset_fn(self.input_context(global_batch_size))
