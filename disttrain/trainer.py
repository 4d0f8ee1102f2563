"""The training loop around a user's ``tf.GradientTape`` step, the same on every backend."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf

from disttrain import data as data_lib
from disttrain import metrics as metrics_lib
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
        """The gradients summed over all replicas (for clipping, surgery or inspection)."""
        return self.backend.reduce_gradients(grads)

    def apply_gradients(self, optimizer: keras.optimizers.Optimizer, grads: list, variables: list) -> None:
        """Sums ``grads`` over all replicas (once) and applies them with ``optimizer``."""
        self.backend.apply_gradients(optimizer, grads, variables)


class Callback:
    """Hooks called by :meth:`Trainer.fit` on every process with the same, globally reduced, values."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_begin(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: dict[str, float]) -> None:
        pass


StepFn = Callable[[StepContext, Any], Any]


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
      model: A built Keras model, created inside ``backend.scope()``.
      optimizer: A Keras optimizer, created inside ``backend.scope()``; built here if needed.
      train_step: ``fn(ctx, batch) -> loss | dict``.
      backend: The backend (default ``get_backend("auto")``).
      eval_step: ``fn(ctx, batch) -> loss | dict`` for validation (no gradients).
      metrics: Keras metrics updated by ``train_step``; reset every epoch.
      eval_metrics: Keras metrics updated by ``eval_step``; reported with a ``val_`` prefix.
      callbacks: :class:`Callback` objects.
      verbose: 0 silent, 1 one line per epoch (on the chief only).

    Raises:
      ValueError: If the model has no variables yet, or model/optimizer were created outside the scope.
    """

    def __init__(self, *, model: keras.Model, optimizer: keras.optimizers.Optimizer, train_step: StepFn,
                 backend: Backend | None = None, eval_step: StepFn | None = None,
                 metrics: Iterable[keras.metrics.Metric] | None = None,
                 eval_metrics: Iterable[keras.metrics.Metric] | None = None,
                 callbacks: Iterable[Callback] = (), verbose: int = 1, print_fn: Callable[[str], None] | None = None):
        self.backend = backend or get_backend("auto")
        self.model, self.optimizer = model, optimizer
        self._train_step, self._eval_step = train_step, eval_step
        self.metrics = metrics_lib.as_list(metrics)
        self.eval_metrics = metrics_lib.as_list(eval_metrics)
        self.callbacks = list(callbacks)
        self.verbose = verbose
        self._print = print_fn or functools.partial(print, flush=True)
        if not model.trainable_variables:
            raise ValueError(f"model {model.name!r} has no variables yet; build it inside backend.scope() "
                             "(start it with keras.Input(shape=...) or call model.build(input_shape))")
        self.backend.check_created_in_scope(model=model, optimizer=optimizer)
        if not optimizer.built:
            with self.backend.scope():
                optimizer.build(model.trainable_variables)
        self.backend.sync_initial_state(list(model.variables) + list(optimizer.variables))
        self._functions: dict[tuple[str, int], Callable] = {}
        self.history: dict[str, list[float]] = {}
        self.stop_training = False

    # -- compiled steps ------------------------------------------------------------------------
    def _function(self, kind: str, global_batch_size: int) -> Callable:
        key = (kind, global_batch_size)
        if key not in self._functions:
            step = self._train_step if kind == "train" else self._eval_step
            ctx = StepContext(backend=self.backend, global_batch_size=global_batch_size)
            backend = self.backend

            def replica_fn(batch):
                return _as_outputs(step(ctx, batch))

            @tf.function
            def run(iterator):
                per_replica = backend.run(replica_fn, args=(next(iterator),))
                return {k: backend.local_sum(v) for k, v in per_replica.items()}

            @tf.function
            def run_batch(batch):  # for pipelines of unknown length: the batch was fetched and agreed on
                per_replica = backend.run(replica_fn, args=(batch,))
                return {k: backend.local_sum(v) for k, v in per_replica.items()}

            self._functions[key] = (run, run_batch)
        return self._functions[key]

    def _run_epoch(self, kind: str, data: Any, *, global_batch_size: int, epoch: int,
                   steps: int | None, seed: int | None, remainder: str = "drop"
                   ) -> tuple[dict[str, float], int, float]:
        backend = self.backend
        # Every process runs the same number of steps (agreed through the backend's all-reduce).
        epoch_input = data_lib.epoch_input(backend, data, global_batch_size=global_batch_size, epoch=epoch,
                                           seed=seed, steps=steps, remainder=remainder)
        run, run_batch = self._function(kind, global_batch_size)
        totals: dict[str, tf.Tensor] = {}
        start = time.perf_counter()
        steps = 0
        while epoch_input.steps is None or steps < epoch_input.steps:
            if epoch_input.steps is None:
                batch = epoch_input.next_agreed()
                if batch is None:
                    break
                outputs = run_batch(batch)
            else:
                outputs = run(epoch_input.iterator)
            steps += 1
            totals = {k: totals[k] + v for k, v in outputs.items()} if totals else dict(outputs)
        if steps == 0:
            raise ValueError(f"an epoch has 0 steps of global batch {global_batch_size}; "
                             "use a smaller global batch or more data")
        names = sorted(totals)
        logs: dict[str, float] = {}
        if names:
            summed = backend.all_reduce(tf.stack([tf.cast(totals[n], tf.float64) for n in names]), "sum")
            logs = {n: float(v) / steps for n, v in zip(names, np.asarray(summed))}
        seconds = time.perf_counter() - start
        return logs, steps, seconds

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
        for callback in self.callbacks:
            callback.on_train_begin(self)
        for epoch in range(initial_epoch, initial_epoch + epochs):
            for callback in self.callbacks:
                callback.on_epoch_begin(self, epoch)
            metrics_lib.reset(self.metrics)
            lr = current_learning_rate(self.optimizer)
            logs, steps, seconds = self._run_epoch(
                "train", data, global_batch_size=global_batch_size, epoch=epoch, steps=steps_per_epoch,
                seed=shuffle_seed, remainder=remainder)
            logs.update(metrics_lib.merged_results(self.backend, self.metrics))
            logs["lr"] = lr
            logs["examples_per_sec"] = steps * global_batch_size / seconds
            if validation_data is not None:
                val = self.evaluate(validation_data, global_batch_size=validation_batch_size or global_batch_size,
                                    steps=validation_steps)
                logs.update({f"val_{k}": v for k, v in val.items()})
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, logs)
            for name, value in logs.items():
                self.history.setdefault(name, []).append(value)
            if self.verbose and self.backend.is_chief:
                shown = " - ".join(f"{k} {v:.4g}" for k, v in logs.items() if k != "examples_per_sec")
                self._print(f"epoch {epoch + 1}/{initial_epoch + epochs} - {shown} - "
                            f"{seconds:.2f}s ({logs['examples_per_sec']:.0f} examples/s)")
            if self.stop_training:
                break
        return self.history

    def evaluate(self, data: Any, *, global_batch_size: int, steps: int | None = None,
                 remainder: str = "pad") -> dict[str, float]:
        """Runs ``eval_step`` over ``data`` and returns globally reduced values and ``eval_metrics``.

        With ``remainder="pad"`` (the default) every example is evaluated exactly once: the last batch is
        padded with masked examples and each batch carries a ``mask`` (see ``disttrain.data``). Metrics
        updated with ``sample_weight=mask`` are then exact; returned step values are averaged per step.

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
                                     steps=steps, seed=None, remainder=remainder)
        logs.update(metrics_lib.merged_results(self.backend, self.eval_metrics))
        return logs
