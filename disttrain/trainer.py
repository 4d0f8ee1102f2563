"""The training loop around a user's ``tf.GradientTape`` step, the same on every backend."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from disttrain import data as data_lib
from disttrain import epoch_agreement
from disttrain import metrics as metrics_lib
from disttrain import step_logs
from disttrain.backends import Backend, get_backend


class StepContext:
    """Handed to the user's step function: the few operations whose meaning depends on the backend.

    Attributes:
      backend: The active backend.
      global_batch_size: Examples per step over all replicas.
      num_replicas: Replicas the global batch is split over.
    """

    def __init__(self, *, backend: Backend, global_batch_size: int):
        self.backend = backend
        self.global_batch_size = global_batch_size
        self.num_replicas = backend.num_replicas
        # (variable, local gradient) pairs, per replica thread, while tracing a gradient-histogram step
        self._capture = threading.local()

    def average_loss(self, per_example_loss: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
        """This replica's share of the mean loss over the GLOBAL batch: ``sum(loss * w) / global_batch``.

        Summed over the replicas (which the gradient reduction does) it is the global mean loss, so the
        gradients match a single device running the whole global batch.
        """
        return tf.nn.compute_average_loss(per_example_loss, sample_weight=sample_weight,
                                          global_batch_size=self.global_batch_size)

    def scale_regularization_loss(self, loss: tf.Tensor) -> tf.Tensor:
        """Divides a regularisation loss by the number of replicas (it is added once per replica)."""
        return loss / tf.cast(self.num_replicas, loss.dtype)

    def reduce_gradients(self, grads: list) -> list:
        """The gradients summed over all replicas: the global gradient, identical on every replica.

        Use it for decisions that need the global gradient (its norm for clipping, a NaN check,
        logging). Do not pass the result to :meth:`apply_gradients`, which sums again; change the
        local gradients instead (linear changes commute with the sum). Clipping by the global norm::

            norm = tf.linalg.global_norm(ctx.reduce_gradients(grads))
            factor = tf.minimum(1.0, clip_norm / norm)
            ctx.apply_gradients(optimizer, [g * factor for g in grads], variables)
        """
        return self.backend.reduce_gradients(grads)

    def apply_gradients(self, optimizer: keras.optimizers.Optimizer, grads: list, variables: list) -> None:
        """Sums ``grads`` over all replicas (once) and applies them with ``optimizer``."""
        captured = getattr(self._capture, "pairs", None)
        if captured is not None:
            captured.extend((v, g) for g, v in zip(grads, variables) if g is not None)
        self.backend.apply_gradients(optimizer, grads, variables)


class Callback:
    """Hooks called by :meth:`Trainer.fit` on every process with the same, globally reduced, values.

    Callbacks that write or print should do so on ``trainer.backend.is_chief`` only.

    Attributes:
      histogram_every_steps: When > 0, :meth:`on_histograms` is called every so many train steps.
      wants_gradients: When True (with ``histogram_every_steps``), those calls get the global gradients.
    """

    histogram_every_steps: int = 0
    wants_gradients: bool = False

    def on_train_begin(self, trainer: "Trainer") -> None:
        pass

    def on_train_end(self, trainer: "Trainer", logs: dict[str, float]) -> None:
        """After the last epoch; ``logs`` are the last epoch's logs."""

    def on_step_logs(self, trainer: "Trainer", step: int, logs: dict[str, float]) -> None:
        """Every ``log_every_steps`` train steps, with the running epoch values reduced over all processes.

        ``step`` is the global train step (continues across epochs); ``trainer.epoch``,
        ``trainer.epoch_step`` and ``trainer.epoch_steps`` say where in the epoch it is.
        """

    def on_histograms(self, trainer: "Trainer", step: int, gradients: dict) -> None:
        """Every ``histogram_every_steps`` steps; ``gradients`` maps variable paths to the global gradients
        (summed over all replicas, i.e. what the optimizer applied) when ``wants_gradients``, else is empty."""

    def on_epoch_begin(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: dict[str, float]) -> None:
        pass


StepFn = Callable[[StepContext, Any], Any]
EXAMPLES = "__examples__"  # the count of real examples in a step's outputs, for padded (masked) input


def _named_gradients(pairs: list) -> dict[str, tf.Tensor]:
    """``{variable path: gradient}`` (a repeated variable gets a ``_<index>`` suffix)."""
    grads: dict[str, tf.Tensor] = {}
    for i, (variable, grad) in enumerate(pairs):
        name = getattr(variable, "path", None) or variable.name
        grads[name if name not in grads else f"{name}_{i}"] = tf.convert_to_tensor(grad)
    return grads


def _as_outputs(value: Any) -> dict[str, tf.Tensor]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): tf.cast(tf.convert_to_tensor(v), tf.float32) for k, v in value.items()}
    return {"loss": tf.cast(tf.convert_to_tensor(value), tf.float32)}


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the optimizer applies at its next step (evaluates schedules)."""
    lr = optimizer._get_current_learning_rate() if hasattr(optimizer, "_get_current_learning_rate") \
        else optimizer.learning_rate
    return float(np.asarray(lr))


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
      optimizer: A Keras optimizer created inside ``backend.scope()`` (built here on all the models'
        trainable variables if needed), or a list of them, each already built on its variables.
      train_step: ``fn(ctx, batch) -> loss | dict``.
      backend: The backend (default ``get_backend("auto")``).
      eval_step: ``fn(ctx, batch) -> loss | dict`` for validation (no gradients).
      metrics: Keras metrics updated by ``train_step``, reset every epoch; or plain functions
        ``fn(y_true, y_pred)``, which become ``keras.metrics.MeanMetricWrapper`` s in ``self.metrics``
        (same order) for the step to update (see ``disttrain.metrics.from_function``).
      eval_metrics: Likewise for ``eval_step``; reported with a ``val_`` prefix.
      callbacks: :class:`Callback` objects.
      verbose: 0 quiet, 1 one line per epoch, 2 a progress bar (always on the chief only).
      log_every_steps: Every so many train steps, reduce the running loss, metrics, LR and throughput
        over all processes and call the callbacks' ``on_step_logs`` (one all-reduce). 0 turns this off;
        None (default) uses 50 when a progress bar or a callback consumes step logs, else 0. The
        processes agree on the largest value asked for.

    Raises:
      ValueError: If the model has no variables yet, or model/optimizer were created outside the scope.
    """

    def __init__(self, *, model: keras.Model | Sequence[keras.Model],
                 optimizer: keras.optimizers.Optimizer | Sequence[keras.optimizers.Optimizer], train_step: StepFn,
                 backend: Backend | None = None, eval_step: StepFn | None = None,
                 metrics: Iterable[keras.metrics.Metric | Callable] | None = None,
                 eval_metrics: Iterable[keras.metrics.Metric | Callable] | None = None,
                 callbacks: Iterable[Callback] = (), verbose: int = 1, print_fn: Callable[[str], None] | None = None,
                 log_every_steps: int | None = None):
        self.backend = backend or get_backend("auto")
        self.model = model
        self._train_step, self._eval_step = train_step, eval_step
        self.metrics = metrics_lib.as_list(metrics, scope=self.backend.scope)  # functions: wrapped, in scope
        self.eval_metrics = metrics_lib.as_list(eval_metrics, scope=self.backend.scope)
        self.callbacks = list(callbacks)
        self.verbose = verbose
        self._print = print_fn or functools.partial(print, flush=True)
        if verbose >= 2:
            from disttrain.progress import ProgressBar

            self.callbacks.append(ProgressBar())
        self.log_every_steps = log_every_steps
        self.global_step = 0
        self.epoch = self.epoch_step = self.epoch_steps = 0
        self.global_batch_size = 0  # of the running fit (read by callbacks, e.g. LR scaling)
        self.fit_config: dict[str, Any] = {}
        self.models = list(model) if isinstance(model, (list, tuple)) else [model]
        self.optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        self.optimizer = self.optimizers[0]  # its learning rate is the one logged as "lr"
        for m in self.models:
            if not m.trainable_variables:
                raise ValueError(f"model {m.name!r} has no variables yet; build it inside backend.scope() "
                                 "(start it with keras.Input(shape=...) or call model.build(input_shape))")
        self.backend.check_created_in_scope(models=self.models, optimizers=self.optimizers)
        for opt in self.optimizers:
            if opt.built:
                continue
            if len(self.optimizers) > 1:
                raise ValueError(f"optimizer {opt.name!r} is not built; with several optimizers build each "
                                 "inside backend.scope(): optimizer.build(its_model.trainable_variables)")
            with self.backend.scope():
                opt.build(self.trainable_variables)
        self.backend.sync_initial_state([v for m in self.models for v in m.variables] +
                                        [v for o in self.optimizers for v in o.variables])
        self._functions: dict[tuple, Callable] = {}
        self.history: dict[str, list[float]] = {}
        self.stop_training = False

    @property
    def trainable_variables(self) -> list:
        """The trainable variables of every model."""
        return [v for m in self.models for v in m.trainable_variables]

    # -- compiled steps ------------------------------------------------------------------------
    def _function(self, kind: str, global_batch_size: int, *, gradients: bool = False,
                  masked: bool = False) -> Callable:
        """The compiled step; with ``gradients`` it returns ``(outputs, {variable path: local gradient})``;
        with ``masked`` the outputs also count the real (unmasked) examples under ``EXAMPLES``."""
        key = (kind, global_batch_size, gradients, masked)
        if key not in self._functions:
            step = self._train_step if kind == "train" else self._eval_step
            ctx = StepContext(backend=self.backend, global_batch_size=global_batch_size)
            backend = self.backend

            def outputs_of(batch):
                outputs = _as_outputs(step(ctx, batch))
                if masked:
                    outputs[EXAMPLES] = tf.reduce_sum(tf.cast(data_lib.mask_of(batch), tf.float32))
                return outputs

            def replica_fn(batch):
                if not gradients:
                    return outputs_of(batch)
                ctx._capture.pairs = captured = []  # replicas may trace in parallel threads
                try:
                    outputs = outputs_of(batch)
                finally:
                    ctx._capture.pairs = None
                return outputs, _named_gradients(captured)

            @tf.function
            def run(iterator):
                per_replica = backend.run(replica_fn, args=(next(iterator),))
                return tf.nest.map_structure(backend.local_sum, per_replica)

            @tf.function
            def run_batch(batch):  # for pipelines of unknown length: the batch was fetched and agreed on
                per_replica = backend.run(replica_fn, args=(batch,))
                return tf.nest.map_structure(backend.local_sum, per_replica)

            self._functions[key] = (run, run_batch)
        return self._functions[key]

    def reset_compiled_steps(self) -> None:
        """Drops the traced steps so the next step is traced again (e.g. after the optimizer's learning
        rate object was replaced: a traced step keeps applying the one it captured)."""
        self._functions.clear()

    def _run_epoch(self, kind: str, data: Any, *, global_batch_size: int, epoch: int,
                   steps: int | None, seed: int | None, remainder: str = "drop",
                   metrics: Sequence[keras.metrics.Metric] = (), step_logger: step_logs.StepLogger | None = None
                   ) -> tuple[dict[str, float], int, float]:
        backend = self.backend
        # Every process runs the same number of steps (agreed through the backend's all-reduce).
        epoch_input = epoch_agreement.epoch_input(backend, data, global_batch_size=global_batch_size, epoch=epoch,
                                                  seed=seed, steps=steps, remainder=remainder)
        totals: dict[str, tf.Tensor] = {}
        if step_logger is not None:  # with unknown lengths, steps_per_epoch is the best guess of the total
            step_logger.begin_epoch(steps=epoch_input.steps or epoch_input.max_steps)
        start = time.perf_counter()
        steps, local_real = 0, tf.constant(0.0)  # unmasked examples seen here (padded input only)
        while epoch_input.steps is None or steps < epoch_input.steps:
            wants_gradients = step_logger is not None and step_logger.wants_gradients(self.global_step + 1)
            run, run_batch = self._function(kind, global_batch_size, gradients=wants_gradients,
                                            masked=epoch_input.masked)
            if epoch_input.steps is None:  # unknown length: the processes agree on every batch
                batch = epoch_input.next_agreed()
                if batch is None:
                    break
                result = run_batch(batch)
            else:
                result = run(epoch_input.iterator)
            outputs, grads = result if wants_gradients else (result, None)
            if epoch_input.masked:
                local_real += outputs.pop(EXAMPLES)
            steps += 1
            totals = {k: totals[k] + v for k, v in outputs.items()} if totals else dict(outputs)
            if kind == "train":
                self.global_step += 1
            if step_logger is not None:
                step_logger.after_step(step=self.global_step, epoch_step=steps, totals=totals, gradients=grads)
        if steps == 0:
            raise ValueError(f"an epoch has 0 steps of global batch {global_batch_size}; "
                             "use a smaller global batch or more data")
        if kind == "train":
            self.epoch_steps = steps
        names = sorted(totals)
        # One all-reduce per epoch: the step values, the wall time, the count of real examples (padded
        # input) and the metrics' states: every process reports the same numbers.
        local = [tf.cast(totals[n], tf.float64) for n in names]
        local.append(tf.constant(time.perf_counter() - start, tf.float64))
        if epoch_input.masked:
            local.append(tf.cast(local_real, tf.float64))
        states, layout = metrics_lib.pack_local_states(backend, metrics)
        summed = np.asarray(backend.all_reduce(tf.concat([tf.stack(local), states], 0), "sum"))
        summed, state_sums = summed[:len(local)], summed[len(local):]
        if epoch_input.masked:
            summed, real = summed[:-1], float(summed[-1])
        # Values are global-batch-scaled (like ctx.average_loss): their sum over the epoch times the
        # global batch, over the examples, is the mean per example; padded examples count for nothing.
        examples = real if epoch_input.masked and real > 0 else steps * global_batch_size
        logs = {n: float(v) * global_batch_size / examples for n, v in zip(names, summed)}
        if layout.slots:
            logs.update(metrics_lib.results_from_vector(backend, layout, state_sums))
        seconds = float(summed[-1]) / backend.size
        return logs, steps, seconds

    def _dispatch(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def run_config(self) -> dict[str, Any]:
        """The run's configuration (backend, topology, optimizer, ``fit`` arguments), e.g. for a summary."""
        backend = self.backend
        return {"backend": backend.name, "processes": backend.size, "replicas": backend.num_replicas,
                "model": ", ".join(m.name for m in self.models),
                "parameters": sum(int(m.count_params()) for m in self.models),
                "optimizer": ", ".join(type(o).__name__ for o in self.optimizers),
                "metrics": [m.name for m in self.metrics], "eval_metrics": [m.name for m in self.eval_metrics],
                **self.fit_config}

    # -- public loop ---------------------------------------------------------------------------
    def fit(self, data: Any, *, global_batch_size: int, epochs: int = 1, steps_per_epoch: int | None = None,
            shuffle_seed: int | None = None, validation_data: Any = None,
            validation_batch_size: int | None = None, validation_steps: int | None = None,
            initial_epoch: int = 0, remainder: str = "drop") -> dict[str, list[float]]:
        """Trains for ``epochs`` epochs and returns the history ``{name: [value per epoch]}``.

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
          initial_epoch: First epoch's number (for resuming).
          remainder: The last partial batch of an epoch: ``"drop"`` it, or ``"pad"`` it with masked
            examples (each batch then carries a ``mask``, see ``disttrain.data``). Validation always pads.

        Raises:
          ValueError: For a global batch that does not split over the replicas, an infinite dataset
            without ``steps_per_epoch``, or examples that are batched or do not fit the model.
        """
        self.backend.input_context(global_batch_size)  # validates the batch before anything runs
        data_lib.check_data(data, model=self.model)
        if validation_data is not None and self._eval_step is None:
            raise ValueError("validation_data needs an eval_step; pass eval_step=fn(ctx, batch) to Trainer")
        self.stop_training = False
        self.global_batch_size = global_batch_size
        self.global_step = int(np.asarray(self.optimizer.iterations))
        intervals = step_logs.agree(self.backend, step_logs.requested_intervals(
            log_every_steps=self.log_every_steps, callbacks=self.callbacks))
        step_logger = step_logs.StepLogger(trainer=self, intervals=intervals) if intervals.active else None
        self.fit_config = {"global_batch_size": global_batch_size, "epochs": epochs,
                           "steps_per_epoch": steps_per_epoch, "initial_epoch": initial_epoch,
                           "shuffle_seed": shuffle_seed, "log_every_steps": intervals.log_every_steps,
                           "histogram_every_steps": intervals.histogram_every_steps}
        for callback in self.callbacks:
            callback.on_train_begin(self)
        logs: dict[str, float] = {}
        for epoch in range(initial_epoch, initial_epoch + epochs):
            self.epoch = epoch
            for callback in self.callbacks:
                callback.on_epoch_begin(self, epoch)
            metrics_lib.reset(self.metrics)
            lr = current_learning_rate(self.optimizer)
            logs, steps, seconds = self._run_epoch(
                "train", data, global_batch_size=global_batch_size, epoch=epoch, steps=steps_per_epoch,
                seed=shuffle_seed, remainder=remainder, metrics=self.metrics, step_logger=step_logger)
            logs["lr"] = lr
            logs["examples_per_sec"] = steps * global_batch_size / seconds
            logs["step_time"] = seconds / steps
            if validation_data is not None:
                val = self.evaluate(validation_data, global_batch_size=validation_batch_size or global_batch_size,
                                    steps=validation_steps)
                logs.update({f"val_{k}": v for k, v in val.items()})
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, logs)
            for name, value in logs.items():
                self.history.setdefault(name, []).append(value)
            if self.verbose == 1 and self.backend.is_chief:
                shown = " - ".join(f"{k} {v:.4g}" for k, v in logs.items()
                                   if k not in ("examples_per_sec", "step_time"))
                self._print(f"epoch {epoch + 1}/{initial_epoch + epochs} - {shown} - "
                            f"{seconds:.2f}s ({logs['examples_per_sec']:.0f} examples/s)")
            if self.stop_training:
                break
        for callback in self.callbacks:
            callback.on_train_end(self, logs)
        return self.history

    def evaluate(self, data: Any, *, global_batch_size: int, steps: int | None = None,
                 remainder: str = "pad") -> dict[str, float]:
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

        Raises:
          ValueError: If the trainer has no ``eval_step``, or for bad input as in :meth:`fit`.
        """
        if self._eval_step is None:
            raise ValueError("evaluate needs an eval_step; pass eval_step=fn(ctx, batch) to Trainer")
        metrics_lib.reset(self.eval_metrics)
        data_lib.check_data(data, model=self.model)
        logs, _, _ = self._run_epoch("eval", data, global_batch_size=global_batch_size, epoch=0,
                                     steps=steps, seed=None, remainder=remainder, metrics=self.eval_metrics)
        return logs
