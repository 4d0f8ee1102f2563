"""The training loop around a user's ``tf.GradientTape`` step, the same on every backend.

:class:`Trainer` reads in the order ``fit`` runs: argument checks, agreed step-log intervals, a restore,
then each epoch (its calls, each followed by the non-finite check, totals, position, step logs, drift check
and checkpointing; validation, callbacks, history, the epoch line) and the final save. Only this module
writes the run's position (``trainer.position``); everything else reads it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Sequence

import keras
import numpy as np

from disttrain import checkpoint as checkpoint_lib
from disttrain import drift as drift_lib
from disttrain import metrics as metrics_lib
from disttrain import models as models_lib
from disttrain import nonfinite, progress, serving
from disttrain import watchdog as watchdog_lib
from disttrain.backends import Backend, failures, get_backend
from disttrain.callbacks import Callback, current_learning_rate, dispatch
from disttrain.checkpoint import Checkpointing, Progress
from disttrain.input import data as data_lib
from disttrain.input import epoch_agreement
from disttrain.loop import epoch_calls, step_calls, step_functions, step_logs
from disttrain.loop.position import PositionField, RunPosition
from disttrain.loop.step_context import StepContext
from disttrain.loop.totals import EpochTotals
from disttrain.preemption import Preempted, exit_now
from disttrain.progress import ProgressBar


StepFn = Callable[[StepContext, Any], Any]


class Trainer:
    """Runs a user's GradientTape step on any backend and reports globally reduced numbers.

    The step is ``train_step(ctx, batch)``: it computes a per-example loss, reduces it with
    ``ctx.average_loss`` (mean over the GLOBAL batch), takes ``tape.gradient`` and calls
    ``ctx.apply_gradients``. It returns the loss (or a dict of such global-batch-scaled values) and may
    update Keras metrics passed as ``metrics``. The trainer compiles it with ``tf.function``, runs it
    on every replica, and reports per epoch the mean over steps of each returned value summed over
    replicas, plus each metric computed from its merged state: numbers identical on every process.

    Args:
      model: A built Keras model, created inside ``backend.scope()``, or a list of them (e.g. a GAN's
        generator and discriminator).
      optimizer: A Keras optimizer created inside ``backend.scope()``, or a list of them. An optimizer that
        is not built yet is built here, inside the scope: a single one on every model's trainable
        variables; with as many optimizers as models (a GAN: ``model=[generator, discriminator]``,
        ``optimizer=[g_opt, d_opt]``), optimizer ``i`` on model ``i``'s. Otherwise build each yourself
        inside ``backend.scope()``: ``optimizer.build(its_variables)``.
      train_step: ``fn(ctx, batch) -> loss | dict``.
      backend: The backend (default ``get_backend("auto")``).
      eval_step: ``fn(ctx, batch) -> loss | dict`` for validation (no gradients).
      metrics: Keras metrics updated by ``train_step``, reset every epoch; or plain functions
        ``fn(y_true, y_pred)``, which become ``keras.metrics.MeanMetricWrapper`` s in ``self.metrics``
        (same order) for the step to update (see ``disttrain.metrics.from_function``).
      eval_metrics: Likewise for ``eval_step``; reported with a ``val_`` prefix.
      callbacks: :class:`Callback` objects.
      verbose: 0 quiet, 1 one line per epoch, 2 a progress bar (always on the chief only).
      print_fn: Where the epoch lines go (default ``print``).
      log_every_steps: Every so many train steps, reduce the running loss, metrics, LR and throughput
        over all processes and call the callbacks' ``on_step_logs`` (one all-reduce). 0 turns this off;
        None (default) uses 50 when a progress bar or a callback consumes step logs, else 0. The
        processes agree on the largest value asked for.
      checkpointing: A :class:`disttrain.Checkpointing`: periodic checkpoints, exact resume when ``fit``
        starts, and a checkpoint-then-exit(42) on SIGTERM/SIGINT (see ``disttrain.checkpoint``).
      accumulation_steps: Gradient accumulation: each replica's batch is split into this many
        micro-batches, ``train_step`` runs on each (unrolled in one compiled step), the gradients it
        passes to ``ctx.apply_gradients`` are summed, and reduced over the replicas and applied once per
        global batch: the same update as one step on the whole batch, with 1/K of the activations in
        memory. A step, the step count, the LR and every log stay per global batch.
      on_nonfinite: A NaN or Inf in the loss given to ``ctx.average_loss`` or in the gradients given to
        ``ctx.apply_gradients``, on any replica: ``"raise"`` (default) raises
        :class:`disttrain.NonFiniteError` on every rank, naming the step and the rank(s), before the update
        is applied; ``"skip"`` skips the update on every rank and counts it (``skipped_steps``);
        ``"ignore"`` applies it. Decided on flags every replica sees (see ``disttrain.nonfinite``);
        a ``LossScaleOptimizer`` keeps its own rule.
      step_timeout: Seconds a step, eager collective, callback or checkpoint save may take inside ``fit``
        and ``evaluate``; longer, and every rank prints where it is, dumps its Python stacks and exits with
        code 124 (see ``disttrain.watchdog``). None (default) reads ``DISTTRAIN_STEP_TIMEOUT``; unset: the
        backend's ``default_step_timeout`` (1800 s under Horovod's MPI controller, else off); 0: off.
      drift_check_every_steps: Every so many train steps, compare checksums of the trainable and optimizer
        variables over every replica (one all-reduce) and raise :class:`disttrain.drift.DriftError`, naming
        the first variable that differs, when they are out of sync (see ``disttrain.drift``). 0: off.

    Attributes:
      position: Where the run is (:class:`disttrain.loop.position.RunPosition`: ``global_step``, ``epoch``,
        ``epoch_step``, ``epoch_steps``, also read-only as ``trainer.global_step`` ...); only ``fit`` moves it.

    Raises:
      ValueError: If the model has no variables yet, model/optimizer were created outside the scope, an
        optimizer is not built and cannot be paired with one model, or ``accumulation_steps`` < 1.
      TypeError: If ``checkpointing`` is not a :class:`disttrain.Checkpointing`.
    """

    def __init__(self, *, model: keras.Model | Sequence[keras.Model],
                 optimizer: keras.optimizers.Optimizer | Sequence[keras.optimizers.Optimizer], train_step: StepFn,
                 backend: Backend | None = None, eval_step: StepFn | None = None,
                 metrics: Iterable[keras.metrics.Metric | Callable] | None = None,
                 eval_metrics: Iterable[keras.metrics.Metric | Callable] | None = None,
                 callbacks: Iterable[Callback] = (), verbose: int = 1, print_fn: Callable[[str], None] | None = None,
                 log_every_steps: int | None = None, checkpointing: Checkpointing | None = None,
                 accumulation_steps: int = 1, on_nonfinite: str = "raise", step_timeout: float | None = None,
                 drift_check_every_steps: int = 0):
        """Creates the trainer; its arguments (Args), errors (Raises) and behaviour: the class docstring."""
        self.backend = backend or get_backend("auto")
        self.on_nonfinite = nonfinite.check_policy(on_nonfinite)
        self._nonfinite = nonfinite.Monitor(policy=on_nonfinite, backend=self.backend, print_fn=print_fn)
        self.step_timeout = watchdog_lib.timeout_from(step_timeout, default=self.backend.default_step_timeout)
        self._marker = watchdog_lib.GradientMarker(backend=self.backend) if self.step_timeout else None
        self.accumulation_steps = step_functions.check_accumulation_steps(accumulation_steps)
        self.model = model
        self._train_step, self._eval_step = train_step, eval_step
        self.metrics = metrics_lib.as_list(metrics, scope=self.backend.scope)  # functions: wrapped, in scope
        self.eval_metrics = metrics_lib.as_list(eval_metrics, scope=self.backend.scope)
        self.callbacks = list(callbacks)
        self.verbose = verbose
        self.print = print_fn or functools.partial(print, flush=True)
        if verbose >= 2:
            self.callbacks.append(ProgressBar())
        self.log_every_steps = log_every_steps
        self.global_batch_size = 0  # of the running fit (read by callbacks, e.g. LR scaling)
        self.fit_config: dict[str, Any] = {}
        self.models, self.optimizers = models_lib.prepare(self.backend, model=model, optimizer=optimizer)
        self.optimizer = self.optimizers[0]  # its learning rate is the one logged as "lr"
        self._drift = drift_lib.DriftCheck(
            backend=self.backend, every_steps=drift_check_every_steps,
            variables=self.trainable_variables + [v for o in self.optimizers for v in o.variables])
        # Train steps run, across fits; starts at the optimizer's count (a model trained before). The trainer
        # keeps its own count: a LossScaleOptimizer does not count the steps it skips.
        self.position = RunPosition(global_step=int(np.asarray(self.optimizer.iterations)))
        # the last pipeline of the training and of the evaluation data, reused for the same data
        self._pipelines = {kind: epoch_agreement.PipelineCache() for kind in ("train", "eval")}
        self._watch = watchdog_lib.Watch(timeout=self.step_timeout, backend=self.backend, marker=self._marker,
                                         where=self.position.describe)
        self.history: dict[str, list[float]] = {}
        self.stop_training = False
        self.epoch_lr: float | None = None  # the LR logged for the running epoch (that of its first step)
        self.checkpointing = checkpoint_lib.session(checkpointing, trainer=self)
        self._resume = failures.resume_hint(checkpointing.directory if checkpointing else None)
        self._calls = step_calls.CompiledCalls(
            backend=self.backend, model=self.model, train_step=train_step, eval_step=eval_step,
            accumulation_steps=self.accumulation_steps, on_nonfinite=self.on_nonfinite, marker=self._marker,
            watch=self._watch, position=self.position, locate=self.position.for_failure, resume=self._resume)
        self._functions = self._calls.functions  # {variant: compiled steps}

    # The run's position, read-only (``trainer.position`` has them; only the loop below moves it).
    global_step = PositionField()  # train steps done, across fits
    epoch = PositionField()  # the epoch under way, or the next one between epochs (0-based)
    epoch_step = PositionField()  # steps of the epoch under way done
    epoch_steps = PositionField()  # steps the epoch under way has (None: not known)

    @property
    def trainable_variables(self) -> list:
        """The trainable variables of every model."""
        return [v for m in self.models for v in m.trainable_variables]

    def fit(self, data: Any, *, global_batch_size: int, epochs: int = 1, steps_per_epoch: int | None = None,
            shuffle_seed: int | None = None, validation_data: Any = None,
            validation_batch_size: int | None = None, validation_steps: int | None = None,
            initial_epoch: int = 0, remainder: str = "drop", steps_per_execution: int = 1) -> dict[str, list[float]]:
        """Trains for ``epochs`` epochs and returns the history ``{name: [value per epoch]}``.

        With ``Trainer(checkpointing=...)``, the first ``fit`` of a trainer first restores the latest
        checkpoint, if there is one, and continues from its exact position (same global batches, same
        history); the run's ``epochs`` still count from ``initial_epoch``.

        Args:
          data: A ``tf.data.Dataset`` of unbatched examples (split exactly over the replicas), a list of
            shard files or a ``disttrain.data`` source (see ``disttrain.data.from_files``), or
            ``fn(input_context) -> dataset of per-replica batches``.
          global_batch_size: Examples per step over all replicas; must divide by the replica count.
          epochs: Epochs to run (counting from ``initial_epoch``).
          steps_per_epoch: Steps per epoch; default one pass over ``data``.
          shuffle_seed: Shuffle ``data`` each epoch with this seed (same order on every backend).
          validation_data: Like ``data``, evaluated with ``eval_step`` after every epoch.
          validation_batch_size: Global batch for validation (default ``global_batch_size``).
          validation_steps: Steps per validation (default one pass).
          initial_epoch: First epoch's number.
          remainder: The last partial batch of an epoch: ``"drop"`` it, or ``"pad"`` it with masked
            examples (each batch then carries a ``mask``, see ``disttrain.data``). Validation always pads.
          steps_per_execution: Run up to this many steps inside one compiled call (a ``tf.while_loop``),
            for training and validation: less Python and dispatch per step for small models. Step
            logs, histograms, profiles, ``Checkpointing(every_steps=...)`` and epoch ends still act at
            their exact steps (a call ends there); what is checked once per call is the preemption
            flag and ``every_seconds`` (a stop waits for the running call, up to K steps). Pipelines of
            unknown length run one step per call.

        Returns:
          ``trainer.history`` (kept over ``fit`` calls): per epoch each returned value, metric, ``val_*``, ``lr``,
          ``examples_per_sec`` and ``step_time`` (leaving out the calls that traced, unless all did).

        Raises:
          ValueError: For a global batch that does not split over the replicas, an infinite dataset
            without ``steps_per_epoch``, examples that are batched or do not fit the model, or a
            checkpoint saved with other ``global_batch_size``, ``shuffle_seed`` or ``steps_per_epoch``.
          disttrain.Preempted: (a ``SystemExit`` with code 42) after a preemption signal, once the
            checkpoint is saved on every process.
        """
        self.backend.input_context(global_batch_size)  # validates the batch before anything runs
        step_calls.check_steps_per_execution(steps_per_execution)
        step_functions.check_micro_batches(global_batch_size, replicas=self.backend.num_replicas,
                                           accumulation_steps=self.accumulation_steps)
        data_lib.check_data(data, model=self.model)
        if validation_data is not None and self._eval_step is None:
            raise ValueError("validation_data needs an eval_step; pass eval_step=fn(ctx, batch) to Trainer")
        self.stop_training = False
        self.global_batch_size = global_batch_size
        intervals = step_logs.agree(self.backend, step_logs.requested_intervals(
            log_every_steps=self.log_every_steps, callbacks=self.callbacks))
        step_logger = step_logs.StepLogger(trainer=self, intervals=intervals) if intervals.active else None
        self.fit_config = {"global_batch_size": global_batch_size, "accumulation_steps": self.accumulation_steps,
                           "epochs": epochs, "steps_per_epoch": steps_per_epoch, "initial_epoch": initial_epoch,
                           "shuffle_seed": shuffle_seed, "steps_per_execution": steps_per_execution,
                           "log_every_steps": intervals.log_every_steps,
                           "histogram_every_steps": intervals.histogram_every_steps}
        session = self.checkpointing
        resume = session.restore() if session is not None and not session.restored else None
        first_epoch = initial_epoch
        if resume is not None:
            self.position.global_step, self.position.epoch = resume.global_step, resume.epoch
            self.position.epoch_step = resume.epoch_step
            first_epoch = resume.epoch
            self.history = {k: list(v) for k, v in resume.history.items()}
        self.dispatch("on_train_begin")
        logs: dict[str, float] = {}
        # The signal watcher stays installed until a preempted process has exited: a launcher that signals
        # again while it ends (horovodrun does) must not turn its exit code 42 into 143.
        with session.watcher if session is not None else contextlib.nullcontext(), self._watch.armed(), \
                failures.translating(self.backend, phase="fit", position=self.position.for_failure, resume=self._resume):
            try:
                for epoch in range(first_epoch, initial_epoch + epochs):
                    logs = self._train_epoch(
                        data, epoch=epoch, steps_per_epoch=steps_per_epoch, shuffle_seed=shuffle_seed,
                        remainder=remainder, step_logger=step_logger,
                        resume=resume if resume is not None and epoch == resume.epoch else None,
                        validation=(validation_data, validation_batch_size, validation_steps))
                    self.position.epoch, self.position.epoch_step = epoch + 1, 0  # after a finished epoch
                    if self.stop_training:
                        break
                if session is not None:
                    session.save_at_end()
            except Preempted:
                self.dispatch("on_train_end", logs)  # summaries and logs are flushed
                if session.config.exit_on_preemption:
                    exit_now()
                raise
        self.dispatch("on_train_end", logs)
        return self.history

    def _train_epoch(self, data: Any, *, epoch: int, steps_per_epoch: int | None, shuffle_seed: int | None,
                     remainder: str, step_logger: step_logs.StepLogger | None, resume: Progress | None,
                     validation: tuple) -> dict[str, float]:
        """One epoch of :meth:`fit`: the steps, validation, callbacks, history and the epoch line."""
        global_batch_size = self.global_batch_size
        self.position.epoch = epoch
        self.dispatch("on_epoch_begin", epoch)
        metrics_lib.reset(self.metrics)
        resumed_lr = resume.epoch_lr if resume is not None and resume.epoch_step else None
        self.epoch_lr = resumed_lr if resumed_lr is not None else current_learning_rate(self.optimizer)
        logs, ran, seconds, untimed = self._run_epoch(
            "train", data, global_batch_size=global_batch_size, epoch=epoch, steps=steps_per_epoch,
            seed=shuffle_seed, remainder=remainder, metrics=self.metrics, step_logger=step_logger, resume=resume,
            steps_per_execution=self.fit_config["steps_per_execution"])
        logs["lr"] = self.epoch_lr
        logs["examples_per_sec"] = ran * global_batch_size / seconds if ran and seconds > 0 else 0.0
        logs["step_time"] = seconds / ran if ran else 0.0
        validation_data, validation_batch_size, validation_steps = validation
        if validation_data is not None:
            val = self.evaluate(validation_data, global_batch_size=validation_batch_size or global_batch_size,
                                steps=validation_steps, steps_per_execution=self.fit_config["steps_per_execution"])
            logs.update({f"val_{k}": v for k, v in val.items()})
        self.dispatch("on_epoch_end", epoch, logs)
        for name, value in logs.items():
            self.history.setdefault(name, []).append(value)
        if self.verbose == 1 and self.backend.is_chief:
            self.print(progress.epoch_line(epoch=epoch, epochs=self.fit_config["initial_epoch"] +
                                           self.fit_config["epochs"], logs=logs, seconds=seconds, untimed=untimed))
        return logs

    def _run_epoch(self, kind: str, data: Any, *, global_batch_size: int, epoch: int,
                   steps: int | None, seed: int | None, remainder: str = "drop",
                   metrics: Sequence[keras.metrics.Metric] = (), step_logger: step_logs.StepLogger | None = None,
                   resume: Progress | None = None, steps_per_execution: int = 1
                   ) -> tuple[dict[str, float], int, float, float]:
        """Runs one epoch (from ``resume``'s position when given) and returns ``(logs, steps timed, their
        seconds, this process's seconds left out)``: the calls that traced a step function are not timed,
        unless all did. Every process runs the same steps and gets the same logs and timing."""
        session = self.checkpointing if kind == "train" else None
        done = resume.epoch_step if resume is not None else 0
        # Every process runs the same number of steps (agreed through the backend's all-reduce).
        epoch_input = epoch_agreement.epoch_input(self.backend, data, global_batch_size=global_batch_size,
                                                  epoch=epoch, seed=seed, steps=steps, remainder=remainder,
                                                  skip_steps=done, pipelines=self._pipelines[kind])
        totals = EpochTotals(backend=self.backend, metrics=metrics, carry=resume.carry if resume is not None else None)
        self._begin_epoch(kind, done=done, epoch_input=epoch_input, step_logger=step_logger)
        calls = epoch_calls.EpochCalls(
            calls=self._calls, kind=kind, global_batch_size=global_batch_size, epoch_input=epoch_input,
            steps_per_execution=steps_per_execution, step_logger=step_logger,
            control=session.control if session is not None else None, drift_every_steps=self._drift.every_steps,
            checkpoint_every_steps=session.config.every_steps if session is not None else None,
            phase=self._watch.phase)
        ran = 0
        while (call := calls.next(step=self.position.global_step, ran=ran)) is not None:
            result, count = call
            self._after_call(kind, result, count=count, epoch=epoch, done=done, ran=ran, totals=totals,
                             step_logger=step_logger, session=session)
            ran += count
        result = self._end_epoch(kind, totals=totals, calls=calls, done=done, ran=ran,
                                 global_batch_size=global_batch_size, masked=epoch_input.masked)
        epoch_input.close()  # its iterator is torn down on another thread (see disttrain.input.release)
        return result

    def _begin_epoch(self, kind: str, *, done: int, epoch_input: Any, step_logger: step_logs.StepLogger | None):
        """The position at an epoch's start (``done`` steps in, resuming); the step logs' window starts."""
        position = self.position
        if kind == "train":
            position.epoch_step = done
            position.epoch_steps = None if epoch_input.steps is None else done + epoch_input.steps
        if step_logger is not None:  # with unknown lengths, steps_per_epoch is the best guess of the total
            position.epoch_steps = position.epoch_steps or epoch_input.max_steps
            step_logger.begin_epoch(done=done)

    def _after_call(self, kind: str, result: step_functions.StepResult, *, count: int, epoch: int, done: int,
                    ran: int, totals: EpochTotals, step_logger: step_logs.StepLogger | None,
                    session: checkpoint_lib.CheckpointSession | None) -> None:
        """After a call of ``count`` steps (``ran`` steps of the epoch before it): the non-finite check, the
        totals, the position, step logs, the drift check and checkpointing, in that order."""
        position = self.position
        where = lambda: f"epoch {epoch + 1}, step {done + ran + 1}/{position.epoch_steps}"  # noqa: E731
        outputs = self._nonfinite.after_call(result.outputs, first_step=position.global_step + 1, count=count,
                                             where=where)
        totals.add(outputs)
        if kind == "train":
            position.global_step += count
            position.epoch_step = done + ran + count
        if step_logger is not None:
            step_logger.after_step(step=position.global_step, epoch_step=done + ran + count, totals=totals,
                                   gradients=result.grads)
        if kind == "train" and self._drift.due(position.global_step):
            self._drift.check(where=f"after global step {position.global_step}")
        if session is not None:
            with self._watch.phase("checkpoint", "the checkpoint after a step"):
                session.after_step(control=result.control, totals=totals)

    def _end_epoch(self, kind: str, *, totals: EpochTotals, calls: epoch_calls.EpochCalls, done: int, ran: int,
                   global_batch_size: int, masked: bool) -> tuple[dict[str, float], int, float, float]:
        """The epoch's logs and timing (see :meth:`_run_epoch`), from one all-reduce: the step values, the
        wall time, the count of real examples (padded input) and the metrics' states.

        Raises:
          ValueError: If the epoch ran no step.
        """
        steps = done + ran
        if steps == 0:
            raise ValueError(f"an epoch has 0 steps of global batch {global_batch_size}: a pipeline of unknown length "
                             "ended before the first step (is the input empty, e.g. filtered away?); "
                             "use a smaller global batch or more data")
        if kind == "train":
            self.position.epoch_steps = steps
        timed, seconds, untimed = calls.timing(ran)
        reduced = totals.reduce(seconds=seconds)
        logs = nonfinite.epoch_logs(reduced, steps=steps, global_batch_size=global_batch_size, masked=masked)
        return logs, timed, reduced.seconds / self.backend.size, untimed

    def evaluate(self, data: Any, *, global_batch_size: int, steps: int | None = None,
                 remainder: str = "pad", steps_per_execution: int = 1) -> dict[str, float]:
        """Runs ``eval_step`` over ``data`` and returns globally reduced values and ``eval_metrics``.

        With ``remainder="pad"`` (the default) every example is evaluated exactly once: the last batch is
        padded with masked examples and each batch carries a ``mask`` (see ``disttrain.data``). Metrics
        updated with ``sample_weight=mask`` are then exact, and so are returned values computed with
        ``ctx.average_loss(..., sample_weight=mask)``: they are reported as means over the real examples.

        Args:
          data: As for :meth:`fit`.
          global_batch_size: Examples per step over all replicas.
          steps: Steps to run (default one pass; required for infinite datasets).
          remainder: ``"pad"`` (exact) or ``"drop"``.
          steps_per_execution: Steps per compiled call, as for :meth:`fit`.

        Returns:
          ``{name: value}``: each returned value (mean per real example) and each ``eval_metrics`` result.

        Raises:
          ValueError: If the trainer has no ``eval_step``, or for bad input as in :meth:`fit`.
        """
        if self._eval_step is None:
            raise ValueError("evaluate needs an eval_step; pass eval_step=fn(ctx, batch) to Trainer")
        step_calls.check_steps_per_execution(steps_per_execution)
        metrics_lib.reset(self.eval_metrics)
        data_lib.check_data(data, model=self.model)
        with self._watch.armed(), failures.translating(self.backend, phase="evaluate", position=self.position.for_failure,
                                                       resume=self._resume):
            logs, *_ = self._run_epoch("eval", data, global_batch_size=global_batch_size, epoch=0, steps=steps,
                                         seed=None, remainder=remainder, metrics=self.eval_metrics,
                                         steps_per_execution=steps_per_execution)
        return logs

    # -- what callbacks and users call beside fit ---------------------------------------------------
    def dispatch(self, hook: str, *args: Any) -> None:
        """Calls ``callback.<hook>(self, *args)`` on every callback, in order (timed by the stall watchdog).

        Args:
          hook: The :class:`Callback` method, e.g. ``"on_step_logs"``.
          *args: Its arguments after the trainer.
        """
        watchdog = self._watch.current
        dispatch(self.callbacks, hook, self, *args,
                 phase=None if watchdog is None else functools.partial(watchdog.phase, "callback"))

    def run_config(self) -> dict[str, Any]:
        """The run's configuration (backend, topology, optimizer, ``fit`` arguments), e.g. for a summary."""
        backend = self.backend
        return {"backend": backend.name, "processes": backend.size, "replicas": backend.num_replicas,
                "model": ", ".join(m.name for m in self.models),
                "parameters": sum(int(m.count_params()) for m in self.models),
                "optimizer": ", ".join(type(o).__name__ for o in self.optimizers),
                "metrics": [m.name for m in self.metrics], "eval_metrics": [m.name for m in self.eval_metrics],
                **self.fit_config}

    def save_model(self, path: str, *, model: keras.Model | None = None, overwrite: bool = False) -> str:
        """Saves a model for serving, once, from the chief; call it on every process (they return when the
        copy is complete, so any may load it). See :func:`disttrain.serving.save_model`.

        Args:
          path: ``*.keras``: a Keras file (``keras.models.load_model``); else a SavedModel for serving.
          model: The model to save; required when the trainer has several (e.g. a GAN's generator).
          overwrite: Replace an existing ``path``.

        Returns:
          ``path``.
        """
        return serving.save_model(model=model, models=self.models, backend=self.backend, path=path,
                                  overwrite=overwrite)

    def reset_compiled_steps(self) -> None:
        """Drops the traced steps, so the next is traced again (e.g. after the optimizer's LR object changed)."""
        self._calls.reset()
