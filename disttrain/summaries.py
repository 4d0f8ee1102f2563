"""TensorBoard summaries written by the chief only, from values already reduced over all processes.

    tb = dt.TensorBoard(logdir="runs/digits", histogram_every_steps=200, config=vars(args))
    trainer = dt.Trainer(..., callbacks=[tb], log_every_steps=20)

Tags (one run directory, one event file, written by the chief process only):

  * ``step/<name>`` every ``log_every_steps`` train steps (x = global step): the loss and other step
    outputs (running mean over the epoch so far), every metric (from merged states), ``lr``,
    ``examples_per_sec`` (global) and ``step_time`` (seconds), both without the calls that traced;
  * ``epoch/<name>`` after every epoch (x = epoch, 0-based): the same names plus ``val_<name>`` for
    evaluation — exactly the numbers in ``trainer.history``;
  * ``weights/<variable path>`` and ``gradients/<variable path>`` histograms every
    ``histogram_every_steps`` steps (gradients: the global gradient the optimizer applied);
  * ``config``: the run configuration as a Markdown table (text summary, step 0);
  * ``run/world_size``: the number of processes, at the global step each start (or resume) of ``fit``
    begins with: an elastic job (``disttrain launch --min-workers/--max-workers``) draws its world size
    over the steps, one point per formation;
  * with ``profile_steps=(first, last)``: a TensorFlow profiler trace of those global train steps under
    ``<logdir>/plugins/profile/`` (TensorBoard's Profile tab, from ``tensorboard-plugin-profile``).

Scalars are scalar-plugin tensor events, as ``tf.summary.scalar`` writes them: read them back with
``EventAccumulator.Tensors(tag)``, not ``Scalars(tag)``.

Non-chief processes create no writer, no directory and no file. Writer creation and flushing are
local file operations; every collective the values need is done by the trainer on every process.
Each logging event is written as ONE serialized ``Summary`` holding TensorBoard's scalar and
histogram protos (the same plugin metadata and bucketing as ``tf.summary.scalar`` / ``histogram``,
computed in numpy): one small op per event instead of a chain of eager TensorFlow ops per value.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.util import tensor_util

from disttrain.callbacks import Callback

__all__ = ["TensorBoard", "run_dir"]  # the public part (dt.summaries.*, dt.TensorBoard)
HISTOGRAM_KINDS = ("weights", "gradients")
HISTOGRAM_BUCKETS = 30  # TensorBoard's default
_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name=None, description=None)
_HISTOGRAM_METADATA = histogram_metadata.create_summary_metadata(display_name=None, description=None)


def scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
    """What ``tf.summary.scalar(tag, value)`` writes (a float32 scalar tensor with scalar metadata)."""
    return summary_pb2.Summary.Value(tag=tag, metadata=_SCALAR_METADATA,
                                     tensor=tensor_util.make_tensor_proto(np.float32(value)))


def histogram_buckets(data, buckets: int = HISTOGRAM_BUCKETS) -> np.ndarray:
    """``[buckets, 3]`` rows ``(left edge, right edge, count)``, bucketed exactly like TensorBoard's
    ``histogram_pb`` (equal-width buckets over ``[min, max]``; all in the last one for a single value)."""
    data = np.asarray(data, dtype=np.float64).reshape(-1)
    if data.size == 0:
        return np.zeros((buckets, 3))
    low, high = float(data.min()), float(data.max())
    if high == low:
        counts = np.zeros(buckets)
        counts[-1] = data.size
        return np.stack([np.full(buckets, low), np.full(buckets, low), counts], axis=1)
    index = np.minimum(np.floor((data - low) / ((high - low) / buckets)).astype(np.int64), buckets - 1)
    edges = np.linspace(low, high, buckets + 1)
    return np.stack([edges[:-1], edges[1:], np.bincount(index, minlength=buckets).astype(np.float64)], axis=1)


def histogram_value(tag: str, data) -> summary_pb2.Summary.Value:
    """What ``tf.summary.histogram(tag, data)`` writes."""
    return summary_pb2.Summary.Value(tag=tag, metadata=_HISTOGRAM_METADATA,
                                     tensor=tensor_util.make_tensor_proto(histogram_buckets(data)))


def run_dir(root: str = "runs", name: str | None = None) -> str:
    """``root/name``, or ``root/<YYYYmmdd-HHMMSS>`` without a name. Creates nothing.

    Only the chief uses the directory, so a timestamp that differs between processes is harmless.

    Args:
      root: The parent directory.
      name: The run's name (default: the time).
    """
    return os.path.join(root, name or time.strftime("%Y%m%d-%H%M%S"))


def config_markdown(config: Mapping[str, Any]) -> str:
    """A two-column Markdown table of ``config`` (values JSON-encoded when not plain)."""
    rows = ["| key | value |", "|---|---|"]
    for key in sorted(config):
        value = config[key]
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            value = json.dumps(value, default=str)
        cell = str(value).replace("|", "\\|")
        rows.append(f"| {key} | {cell} |")
    return "\n".join(rows)


class TensorBoard(Callback):
    """Writes scalars, histograms and the run configuration for TensorBoard, on the chief only.

    Args:
      logdir: Directory of the run's event file (created by the chief when training starts).
      histogram_every_steps: Write weight/gradient histograms every so many train steps; 0 = never.
        Gradient histograms cost one extra all-reduce of all gradients on those steps.
      histograms: Which histograms: any of ``"weights"``, ``"gradients"``.
      config: Extra run configuration (e.g. ``vars(args)``) added to ``trainer.run_config()`` in the
        ``config`` text summary.
      announce: Print the ``tensorboard --logdir`` command when training starts (chief, verbose > 0).
      profile_steps: ``(first, last)``: record a TensorFlow profiler trace from just before global
        train step ``first`` (1-based) to just after step ``last``, on the chief only (as Keras'
        ``profile_batch``). Profile a few steps after the first, which includes tracing.

    Raises:
      ValueError: For a negative interval, an unknown histogram kind or a bad profile window.
    """

    def __init__(self, *, logdir: str, histogram_every_steps: int = 0,
                 histograms: Sequence[str] = HISTOGRAM_KINDS, config: Mapping[str, Any] | None = None,
                 announce: bool = True, profile_steps: tuple[int, int] | None = None):
        if profile_steps is not None:
            first, last = (int(v) for v in profile_steps)
            if not 1 <= first <= last:
                raise ValueError(f"profile_steps={tuple(profile_steps)} must be (first, last) train steps with "
                                 f"1 <= first <= last, e.g. (10, 20)")
            profile_steps = (first, last)
        self.profile_steps = profile_steps
        self._profiling = False
        if histogram_every_steps < 0:
            raise ValueError(f"histogram_every_steps={histogram_every_steps} must be >= 0 (0 = no histograms)")
        unknown = sorted(set(histograms) - set(HISTOGRAM_KINDS))
        if unknown:
            raise ValueError(f"unknown histogram kinds {unknown}; use any of {list(HISTOGRAM_KINDS)}")
        self.logdir = os.fspath(logdir)
        self.histogram_every_steps = int(histogram_every_steps) if histograms else 0
        self.histograms = tuple(histograms)
        self.wants_gradients = "gradients" in self.histograms
        self.config = dict(config or {})
        self.announce = announce
        self._writer: tf.summary.SummaryWriter | None = None

    @property
    def command(self) -> str:
        """The command that shows these logs."""
        return f"tensorboard --logdir {self.logdir}"

    # -- writer (chief only, no collectives) -----------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        if not trainer.backend.is_chief:
            return
        if self._writer is None:
            os.makedirs(self.logdir, exist_ok=True)
            self._writer = tf.summary.create_file_writer(self.logdir)
        with self._writer.as_default():
            tf.summary.text("config", config_markdown({**trainer.run_config(), **self.config}), step=0)
        self._write(trainer.position.global_step, [scalar_value("run/world_size", trainer.backend.size)])
        self._writer.flush()
        if self.announce and trainer.verbose:
            trainer.print(f"TensorBoard logs in {self.logdir}: {self.command}")

    def _write(self, step: int, values: list) -> None:
        """Writes ``Summary.Value`` protos as one event at ``step``."""
        if self._writer is None or not values:
            return
        with self._writer.as_default():
            tf.summary.experimental.write_raw_pb(summary_pb2.Summary(value=values).SerializeToString(), step=step)

    def _scalars(self, prefix: str, step: int, logs: Mapping[str, float]) -> None:
        if self._writer is not None:
            self._write(step, [scalar_value(f"{prefix}/{name}", value) for name, value in logs.items()])

    def on_step_logs(self, trainer, step: int, logs: dict[str, float]) -> None:
        self._scalars("step", step, logs)

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        self._scalars("epoch", epoch, logs)
        if self._writer is not None:
            self._writer.flush()

    def on_histograms(self, trainer, step: int, gradients: dict) -> None:
        if self._writer is None or step % self.histogram_every_steps:
            return
        arrays = {}
        if "weights" in self.histograms:
            for variable in trainer.trainable_variables:
                raw = getattr(variable, "value", variable)
                local = trainer.backend.local_values(raw)[0]  # this process's copy: no communication
                arrays[f"weights/{getattr(variable, 'path', variable.name)}"] = np.asarray(local)
        if "gradients" in self.histograms:
            arrays.update({f"gradients/{name}": np.asarray(value) for name, value in gradients.items()})
        self._write(step, [histogram_value(tag, array) for tag, array in arrays.items()])

    # -- profiler (chief only; called by the step logger at the window's edges) ---------------------
    def start_profile(self, trainer) -> None:
        """Starts the TF profiler (chief only), just before global step ``profile_steps[0]``.

        Args:
          trainer: The running trainer.
        """
        if not trainer.backend.is_chief or self._profiling:
            return
        os.makedirs(self.logdir, exist_ok=True)
        tf.profiler.experimental.start(self.logdir)
        self._profiling = True

    def stop_profile(self, trainer) -> None:
        """Stops the profiler and writes its trace, just after step ``profile_steps[1]`` (or at the end).

        Args:
          trainer: The running trainer.
        """
        if self._profiling:
            self._profiling = False
            tf.profiler.experimental.stop()  # writes <logdir>/plugins/profile/<time>/<host>.xplane.pb

    def on_train_end(self, trainer, logs: dict[str, float]) -> None:
        self.stop_profile(trainer)  # training ended inside the window
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
