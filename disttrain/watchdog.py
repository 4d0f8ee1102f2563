"""Stall watchdog: a step, collective or callback that does not finish in time aborts every rank, saying where.

    trainer = dt.Trainer(..., step_timeout=120)   # or DISTTRAIN_STEP_TIMEOUT=120 in the environment

Off by default, except where a lost peer has no other bound: under Horovod's MPI controller (mpirun) it
runs with 1800 s (``Backend.default_step_timeout``); ``step_timeout=0`` or ``DISTTRAIN_STEP_TIMEOUT=0``
turns it off there too. (MultiWorker's heartbeats and Gloo's timeout end a wait for a lost peer by
themselves, with a :class:`disttrain.CollectiveError`.)

A synchronous run stalls as a whole when one rank stops making progress: its peers wait for it in the
next collective, forever by default (neither Horovod nor ``tf.distribute`` time out). While ``fit`` or
``evaluate`` runs with a timeout, a daemon thread on every rank watches the phase the trainer is in:

  * ``step``: inside a compiled train or eval step (the user's step and the collectives in it);
  * ``collective``: an eager collective of the backend (epoch agreement, the epoch's or the step logs'
    all-reduce, a barrier, ...), named with its caller;
  * ``callback``: a callback hook (user code between steps);
  * ``input``: fetching the next batch of a pipeline of unknown length (with its agreement);
  * ``checkpoint``: after a step, while a checkpoint is saved.

A phase that lasts longer than the timeout makes the thread print one message naming the backend, the
rank, the global step and the phase, dump every thread's Python stack (``faulthandler``) and end the
process with :data:`STALL_EXIT_CODE`. Every rank does this on its own clock, so each says where IT was.
Until the first step of a ``fit`` or ``evaluate`` has finished, and for the first call of each compiled
step (which traces it), a phase gets three timeouts: ranks reach the start at different times.

What a rank can know about a compiled step: the step marks, in a variable per replica, the moment its
gradients reach ``ctx.apply_gradients``. A rank whose mark is set waits in the step's collectives (the
gradient all-reduce): a peer has not joined, and that peer's own message says where it is. A rank whose
mark is not set is still computing its own step (input, forward or backward pass, or code the step
calls): that is the stalled rank (unless several are stuck). A stalled peer shows up on the other ranks
as a wait in the step's collectives, or in the next eager collective if they had left the step.
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

import tensorflow as tf

from disttrain import exit_status

#: Exit status of a process the watchdog aborted (as coreutils ``timeout``).
STALL_EXIT_CODE = 124

#: Environment variable giving the timeout in seconds when ``Trainer(step_timeout=None)``.
TIMEOUT_ENV = "DISTTRAIN_STEP_TIMEOUT"

#: The first call of a compiled step traces and compiles it: it gets this many timeouts.
FIRST_CALL_FACTOR = 3

KINDS = ("step", "collective", "callback", "input", "checkpoint")

_NULL = contextlib.nullcontext()
_active: "Watchdog | None" = None


def timeout_from(value: float | None, environ: dict | None = None, *, default: float | None = None) -> float | None:
    """The watchdog timeout in seconds: ``value``, else :data:`TIMEOUT_ENV`, else ``default`` (the backend's
    :attr:`~disttrain.Backend.default_step_timeout`); None when off (0 turns it off).

    Raises:
      ValueError: For a negative or non-numeric timeout.
    """
    source = "step_timeout"
    if value is None:
        raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "").strip()
        if not raw:
            return default
        source = TIMEOUT_ENV
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; e.g. {TIMEOUT_ENV}=300") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{source}={value!r} must be a number of seconds >= 0 (0 or None turns the watchdog off)")
    return float(value) or None


def collective(what: str) -> contextlib.AbstractContextManager:
    """The phase of an eager collective ``what`` (a no-op unless a watchdog runs): used by the backends."""
    if _active is None:
        return _NULL
    caller = sys._getframe(2).f_code  # noqa: SLF001 - the function that asked for the collective
    return _active.phase("collective", f"{what} called from {caller.co_qualname} ({os.path.basename(caller.co_filename)})")


class GradientMarker:
    """In-graph marks, per local replica, of the step call whose batch arrived and whose gradients reached
    ``ctx.apply_gradients``: what the watchdog reads to tell computing from waiting.

    Args:
      backend: The backend: the variables are created in its scope, synchronised on read, so each replica
        writes its own copies and the watchdog reads them with ``backend.local_values``.
    """

    def __init__(self, *, backend: Any):
        self.backend = backend
        with backend.scope():
            self.batch, self.gradients = (
                tf.Variable(tf.zeros([], tf.int64), trainable=False, name=f"disttrain_{name}_mark",
                            synchronization=tf.VariableSynchronization.ON_READ,
                            aggregation=tf.VariableAggregation.NONE) for name in ("batch", "gradients"))

    @staticmethod
    def _mark(variable: tf.Variable, step: tf.Tensor, after: list) -> Any:
        with tf.control_dependencies([t for t in after if t is not None]):
            return variable.assign(tf.cast(step, tf.int64), read_value=False)

    def mark_batch(self, step: tf.Tensor, batch: Any) -> Any:
        """In a replica context (traced): sets this replica's batch mark to ``step`` (the call's number) once
        ``batch`` is here, and returns ``batch`` made to depend on the mark, so the step's own ops (which may
        block an executor thread, e.g. a ``tf.py_function``) run after it."""
        mark = self._mark(self.batch, step, [t for t in tf.nest.flatten(batch) if tf.is_tensor(t)])
        with tf.control_dependencies([mark]):
            return tf.nest.map_structure(lambda t: tf.identity(t) if tf.is_tensor(t) else t, batch)

    def mark_gradients(self, step: tf.Tensor, grads: list) -> None:
        """In a replica context (traced): sets this replica's gradient mark to ``step`` once ``grads`` exist
        (the gradients' collectives do not wait for it: they are asynchronous kernels and hold no thread)."""
        self._mark(self.gradients, step, list(grads))

    def replicas_at(self, step: int) -> tuple[int, int, int]:
        """``(local replicas with their batch of call ``step``, ... with its gradients, local replicas)``;
        readable from another thread while the step runs."""
        counts = [sum(int(v.numpy()) == step for v in self.backend.local_values(var))
                  for var in (self.batch, self.gradients)]
        return counts[0], counts[1], len(self.backend.local_values(self.batch))


class _Phase:
    __slots__ = ("kind", "what", "mark", "started", "deadline")

    def __init__(self, kind: str, what: str, mark: int | None, started: float, deadline: float):
        self.kind, self.what, self.mark, self.started, self.deadline = kind, what, mark, started, deadline


class Watchdog:
    """Aborts this process when a phase of the training loop exceeds ``timeout`` (a context manager).

    Args:
      timeout: Seconds a phase may last.
      identity: ``"<backend>: rank r of n"``, for the message.
      where: Returns the trainer's position (global step, epoch) for the message.
      hint: Backend-specific advice appended to the message (e.g. Horovod's own stall inspector).
      input_waits_for_peers: The backend's input iterator runs a collective per batch (MultiWorker).
      marker: The step's :class:`GradientMarker`, or None.
      exit: Ends the process (default ``os._exit``); replaced in tests.
    """

    def __init__(self, *, timeout: float, identity: str, where: Callable[[], str], hint: str = "",
                 input_waits_for_peers: bool = False, marker: GradientMarker | None = None,
                 exit: Callable[[int], None] = os._exit):
        self.timeout, self.identity, self.where, self.hint = timeout, identity, where, hint
        self.input_waits_for_peers = input_waits_for_peers
        self.marker = marker
        self._exit = exit
        self._stack: list[_Phase] = []
        self._owner = threading.get_ident()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fired = False
        self._started = False  # has a step finished since the watchdog was armed?
        self.step_applies_gradients = True  # set by the trainer per compiled step

    # -- arming ----------------------------------------------------------------------------------
    def __enter__(self) -> "Watchdog":
        global _active
        self._owner = threading.get_ident()
        self._started = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="disttrain-watchdog", daemon=True)
        self._thread.start()
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stack.clear()

    @contextlib.contextmanager
    def _entered(self, phase: _Phase, *, started: bool) -> Iterator[None]:
        self._stack.append(phase)
        try:
            yield
        finally:
            self._stack.pop()
        self._started = self._started or started  # a step finished: the run is under way

    def phase(self, kind: str, what: str, *, mark: int | None = None, first: bool = False, count: int = 1
              ) -> contextlib.AbstractContextManager:
        """A timed phase (on the thread that armed the watchdog; other threads are not watched).

        Args:
          kind: One of :data:`KINDS`.
          what: What runs, e.g. ``"train step"`` or ``"ProgressBar.on_step_logs"``.
          mark: The value a ``step`` phase's call writes into the :class:`GradientMarker` (unique per call).
          first: The first call of a compiled step (traces it): :data:`FIRST_CALL_FACTOR` timeouts, as
            every phase before the first step has finished.
          count: Steps the phase runs (``steps_per_execution``): it gets that many timeouts.
        """
        if self._thread is None or threading.get_ident() != self._owner:
            return _NULL
        now = time.monotonic()
        limit = self.timeout * count * (FIRST_CALL_FACTOR if first or not self._started else 1)
        return self._entered(_Phase(kind, what, mark, now, now + limit), started=kind == "step")

    # -- watching --------------------------------------------------------------------------------
    def _watch(self) -> None:
        poll = min(1.0, max(0.02, self.timeout / 20))
        while not self._stop.wait(poll):
            stack = list(self._stack)
            if stack and time.monotonic() > stack[-1].deadline:
                self._abort(stack)
                return

    def describe(self, stack: list[_Phase]) -> str:
        """The message for a stall in the innermost phase of ``stack``."""
        phase = stack[-1]
        seconds = time.monotonic() - phase.started
        outer = "".join(f" (inside {p.kind} {p.what})" for p in reversed(stack[:-1]))
        head = (f"disttrain watchdog: {self.identity}, {self.where()}: {phase.kind} phase '{phase.what}'{outer} has "
                f"not finished after {seconds:.1f} s (timeout {self.timeout:g} s). ")
        if phase.kind == "step":
            body = self._inside_step(phase)
        elif phase.kind == "collective":
            body = ("This rank waits in an eager collective that a peer has not reached: the peer is stuck "
                    "elsewhere (its own message says where) or has died.")
        elif phase.kind == "callback":
            body = "This rank is running a callback (user code between steps); its peers wait for it in their next collective."
        elif phase.kind == "input":
            body = ("This rank waits for its next batch or for the other ranks to agree that every rank has one "
                    "(a slow or stuck input pipeline here, or a peer that has not reached the agreement).")
        else:
            body = "This rank is saving a checkpoint (the save may itself wait for the other ranks)."
        tail = (f" Python stacks of every thread follow; aborting with exit code {STALL_EXIT_CODE}. Raise "
                f"Trainer(step_timeout=...) or {TIMEOUT_ENV} if this phase is legitimately this slow.")
        return head + body + (" " + self.hint if self.hint else "") + tail

    def _inside_step(self, phase: _Phase) -> str:
        if self.marker is None or phase.mark is None:
            return "(this step carries no marks: compare with the other ranks' messages)"
        try:
            batch, ready, replicas = self.marker.replicas_at(phase.mark)
        except Exception as err:  # noqa: BLE001 - the message must still be printed
            return f"(could not read the step's marks: {err})"
        if not self.step_applies_gradients:
            ready = 0
        if ready == replicas:
            return ("This rank's gradients of this step had reached ctx.apply_gradients: it WAITS in the step's "
                    "collectives (the gradient all-reduce) for a peer that has not joined; the stalled rank is the "
                    "one whose message says it is inside its own step or in a callback.")
        if batch < replicas:
            if self.input_waits_for_peers:
                return ("This rank had not received its batch of this step: its input iterator hands out a "
                        "batch only once every worker has one (a collective of tf.distribute's multi-worker "
                        "input), so it waits for its own input pipeline or for a peer that has not started this "
                        "step (then the peer's message says where it is).")
            return ("This rank had not received its batch of this step: it waits for its own input pipeline "
                    "(reading, decoding or a map function).")
        if not self.step_applies_gradients:
            return ("This rank had its batch; the step does not call ctx.apply_gradients (e.g. an evaluation step), "
                    "so it is computing its own step or waits in a collective the step runs itself; compare with "
                    "the other ranks' messages.")
        partly = f" ({ready} of its {replicas} replicas had)" if ready else ""
        return ("This rank had its batch but had NOT passed its gradients of this step to ctx.apply_gradients"
                f"{partly}: it is inside its own step (the forward or backward pass, or code the step calls), and "
                "its peers wait for it in the step's collectives.")

    def _abort(self, stack: list[_Phase]) -> None:
        if self._fired:
            return
        self._fired = True
        message = self.describe(stack)
        exit_status.record(code=STALL_EXIT_CODE, reason=message)  # for `disttrain run`
        stream = sys.stderr if _has_fileno(sys.stderr) else sys.__stderr__
        try:
            stream.write(message + "\n")
            stream.flush()
            faulthandler.dump_traceback(file=stream, all_threads=True)
            stream.flush()
        finally:
            # Peers time out at about the same moment: give their watchdogs time to speak before a
            # launcher that sees this exit kills them.
            time.sleep(min(3.0, self.timeout))
            self._exit(STALL_EXIT_CODE)


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


class Watch:
    """A trainer's stall watchdog over its ``fit`` and ``evaluate`` calls: armed around each (once when they
    nest, as ``fit``'s validation does), and the timed phases of the loop while armed (no-ops otherwise).

    Args:
      timeout: The trainer's ``step_timeout`` in seconds; None: never armed.
      backend: The trainer's backend (its name, rank, size, stall hint and input behaviour).
      where: Returns the loop's position for the message.
      marker: The compiled steps' :class:`GradientMarker`, or None.

    Attributes:
      current: The armed :class:`Watchdog`, or None.
    """

    def __init__(self, *, timeout: float | None, backend: Any, where: Callable[[], str],
                 marker: GradientMarker | None):
        self.timeout, self.backend, self.where, self.marker = timeout, backend, where, marker
        self.current: Watchdog | None = None

    def phase(self, kind: str, what: str) -> contextlib.AbstractContextManager:
        """The timed phase ``kind`` (one of :data:`KINDS`) doing ``what``, when armed; else a no-op."""
        return self.current.phase(kind, what) if self.current is not None else _NULL

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Arms the watchdog for what runs inside (unless off, or armed already).

        Yields:
          Nothing; the watchdog watches until the block ends.
        """
        if not self.timeout or self.current is not None:
            yield
            return
        backend = self.backend
        self.current = Watchdog(
            timeout=self.timeout, identity=f"{backend.name}: rank {backend.rank} of {backend.size}",
            where=self.where, hint=backend.stall_hint(), input_waits_for_peers=backend.input_waits_for_peers,
            marker=self.marker)
        try:
            with self.current:
                yield
        finally:
            self.current = None
