"""Agreeing on each epoch's length across processes, so every process runs the same number of steps.

Every process must take part in every collective of a step: a process that ran out of data while the
others continue would leave them waiting forever. Before an epoch, each process computes how many
steps its own pipeline gives (from known lengths, without building it when it can) and ONE all-reduce
through the backend yields the agreed count (:func:`epoch_input`). When a length is unknown, the
processes agree step by step instead (:meth:`EpochInput.next_agreed`). A :class:`PipelineCache` lets a
trainer reuse the pipeline of the same data from one epoch (or ``fit``) to the next.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from disttrain.backends.base import Backend, InputContext
from disttrain.input.data import INFINITE_STEPS, Source, as_source
from disttrain.input.data_checks import raise_spec_mismatch, spec_hash
from disttrain.input import release
from disttrain.input.pipelines import REMAINDERS, check_choice, pipeline_options


def _local_steps(dataset: tf.data.Dataset, context: InputContext) -> int | None:
    """Steps this pipeline gives: None when unknown, ``INFINITE_STEPS`` when infinite."""
    size = int(dataset.cardinality())
    if size == tf.data.INFINITE_CARDINALITY:
        return INFINITE_STEPS
    if size < 0:
        return None
    return size // context.replicas_per_pipeline


class PipelineCache:
    """The pipeline last built for a dataset or :class:`disttrain.data.Source`, reused while they come again.

    Building an epoch's pipeline (batching, prefetching, options; ``distribute_dataset`` on a strategy) takes
    milliseconds, several steps of a small model, and gives the same pipeline again for the same data and
    arguments: every epoch when there is no shuffle seed, and when a run repeats an epoch number (e.g.
    ``fit(epochs=1)`` in a loop). Each epoch still iterates it afresh. The key is the data object itself
    (both kinds are immutable) with every argument of the build; the cache keeps that object, and its
    pipeline, alive until other data replaces it (one entry: a trainer keeps one cache for training and
    one for evaluation). Lists of files and ``dataset_fn`` callables are built every epoch.
    """

    def __init__(self):
        self._entry: tuple[Any, tuple, Any] | None = None  # (data, key, pipeline)

    def get(self, data: Any, key: tuple, make: Any) -> Any:
        """The pipeline of ``data`` for ``key`` (the build's other arguments), from ``make()`` when new."""
        if not isinstance(data, (tf.data.Dataset, Source)):
            return make()
        entry = self._entry
        if entry is not None and entry[0] is data and entry[1] == key:
            return entry[2]
        self._entry = None  # the old pipeline goes before the new one is built
        pipeline = make()
        self._entry = (data, key, pipeline)
        return pipeline


class EpochInput:
    """One epoch's step inputs on this process, with a step count every process agrees on.

    Attributes:
      steps: Steps to run (the same on every process), or None when the pipelines' lengths are unknown:
        then call :meth:`next_agreed` before every step, which stops all processes together.
      iterator: Iterator of step inputs (what ``backend.run`` takes).
      masked: The batches carry a padding mask (``remainder="pad"``): see :func:`disttrain.data.mask_of`.
      element_spec: What every rank agreed it feeds: the examples' spec, or the per-replica batches' of a
        ``dataset_fn`` (None when unknown).
    """

    def __init__(self, *, backend: Backend, iterator: Any, steps: int | None, max_steps: int | None,
                 masked: bool = False, element_spec: Any = None):
        self.backend, self.iterator, self.steps, self.max_steps = backend, iterator, steps, max_steps
        self.masked = masked  # batches carry a padding mask (see mask_of)
        self.element_spec = element_spec
        self._taken = 0

    def close(self) -> None:
        """Gives up the iterator; it is torn down on :mod:`disttrain.input.release`'s thread."""
        iterator, self.iterator = self.iterator, None
        release.release(iterator)

    def next_agreed(self) -> Any | None:
        """The next step input, or None (on every process) once any process has run out of data or
        ``max_steps`` were taken. One all-reduce per call.

        The pipelines are made endless by :func:`_with_end_flag`: each element says whether it is real
        data, so a process that ran out still answers (a tf.distribute iterator would otherwise hand it
        empty batches while the others continue, and a Horovod rank would stop and leave its peers
        waiting in a collective).
        """
        if self.max_steps is not None and self._taken >= self.max_steps:
            return None
        batch, real = next(self.iterator)
        local = all(bool(np.asarray(v)) for v in self.backend.local_values(real))
        if not self.backend.all_reduce(int(local), "min"):
            return None
        self._taken += 1
        return batch


def _with_end_flag(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``(element, True)`` for every element of ``dataset``, then ``(filler, False)`` forever."""
    def filler(s: tf.TensorSpec) -> tf.Tensor:
        if s.shape.rank is None:
            raise ValueError(f"cannot agree on the steps of a pipeline whose elements have unknown rank ({s}); "
                             "give its elements a known shape or pass steps_per_epoch with a repeating dataset")
        return tf.zeros([d if d is not None else 0 for d in s.shape.as_list()], s.dtype)

    end = tf.data.Dataset.from_tensors((tf.nest.map_structure(filler, dataset.element_spec),
                                        tf.constant(False))).repeat()
    real = dataset.map(lambda *b: (b[0] if len(b) == 1 else b, tf.constant(True)))
    return real.concatenate(end).with_options(pipeline_options())


def epoch_input(backend: Backend, data: Any, *, global_batch_size: int, epoch: int = 0, seed: int | None = None,
                steps: int | None = None, remainder: str = "drop", skip_steps: int = 0,
                pipelines: PipelineCache | None = None) -> EpochInput:
    """Builds this process's input for one epoch and agrees with the other processes on its length.

    Each process computes how many steps its pipeline gives; one all-reduce yields the minimum (for
    ``remainder="drop"`` and for ``dataset_fn`` callables) or the maximum (``"pad"``: shorter pipelines
    are padded with fully masked batches), capped by ``steps``. If any pipeline's length is unknown,
    the processes agree step by step instead (see :meth:`EpochInput.next_agreed`).

    Args:
      backend: The backend.
      data: A dataset, a list of files, a :class:`disttrain.data.Source`, or ``fn(input_context)``
        returning per-replica batches.
      global_batch_size: Examples per step over all replicas.
      epoch: Epoch number (reshuffles).
      seed: Shuffle seed; None keeps the order.
      steps: Steps wanted (``steps_per_epoch``); required for infinite datasets.
      remainder: ``drop`` or ``pad``.
      skip_steps: Steps of this epoch already done (a resumed run): the pipelines skip their first
        ``skip_steps`` step inputs, and ``steps`` of the result counts the remaining ones only.
      pipelines: Reuse a pipeline of the same data and arguments built before (pipelines of known length).

    Raises:
      ValueError: For an infinite dataset without ``steps``, an epoch of 0 steps, or ``skip_steps``
        beyond the epoch's end.
    """
    check_choice("remainder", remainder, REMAINDERS)
    context = backend.input_context(global_batch_size)
    source = as_source(data)
    if source is None:
        build = data
        built = data(context)
        local, spec, what = _local_steps(built, context), built.element_spec, "per-replica batches"
        padded = False
    else:
        def build(ctx, pad_to_steps=None):
            return source.build(ctx, seed=seed, epoch=epoch, remainder=remainder, pad_to_steps=pad_to_steps)

        local = source.local_steps(context, seed=seed, epoch=epoch, remainder=remainder)
        spec, what = source.element_spec, "examples"
        if local is None:
            built = build(context)
            local = _local_steps(built, context)
            if spec is None:
                spec, what = built.element_spec, "per-replica batches"
        padded = remainder == "pad"
    # One all-reduce: min of [-unknown, steps, -steps, hash, -hash] = [-any unknown, min steps, -max steps,
    # min hash, -max hash] of the element specs: the ranks agree on the length and see whether they feed alike.
    digest = spec_hash(spec)
    agreed = backend.all_reduce(np.array([-(local is None), local or 0 if local is not None else INFINITE_STEPS,
                                          -(local or 0), digest, -digest], np.int64), "min")
    if int(agreed[3]) != -int(agreed[4]):
        raise_spec_mismatch(backend, spec, what=what)
    any_unknown, lowest, highest = bool(-agreed[0]), int(agreed[1]), int(-agreed[2])
    if any_unknown:
        if padded:
            raise ValueError("remainder='pad' needs pipelines of known length; the dataset's cardinality is "
                             "unknown (e.g. after filter()): use remainder='drop', or set it with "
                             "dataset.apply(tf.data.experimental.assert_cardinality(n))")
        iterator = iter(backend.distribute_dataset(lambda ctx: _with_end_flag(_skipped(build(ctx), ctx, skip_steps)),
                                                   global_batch_size=global_batch_size))
        return EpochInput(backend=backend, iterator=iterator, steps=None, element_spec=spec,
                          max_steps=None if steps is None else max(0, steps - skip_steps))
    available = highest if padded else lowest
    if available >= INFINITE_STEPS and steps is None:
        raise ValueError("the dataset is infinite (it repeats); pass steps_per_epoch (or validation_steps) "
                         "to say how many steps make an epoch")
    run_steps = available if steps is None else min(int(steps), available)
    if steps is not None and steps > available and backend.is_chief:
        warnings.warn(f"{steps} steps per epoch were asked for but the data gives {available} steps of "
                      f"global batch {global_batch_size}; running {available}", stacklevel=3)
    if run_steps <= 0:
        if highest == 0 and steps != 0:
            raise ValueError(f"the input is empty: every rank's pipeline gives 0 batches of global batch "
                             f"{global_batch_size} (no examples, or fewer than one per-replica batch); check the "
                             "data (an empty dataset, a filter that drops everything, a dataset_fn that shards "
                             "everything away) or use a smaller global batch")
        raise ValueError(f"an epoch has 0 steps of global batch {global_batch_size}: this rank's pipeline gives "
                         f"{local} step(s) and the shortest 0 (its examples do not fill its share of one batch, "
                         "or it is empty); use a smaller global batch, more data, or remainder='pad'")
    if skip_steps > run_steps:
        raise ValueError(f"cannot skip {skip_steps} steps of an epoch of {run_steps} steps of global batch "
                         f"{global_batch_size}: the data changed since the checkpoint; resume with the same data")
    remaining = run_steps - skip_steps
    if remaining == 0:  # resumed right at the epoch's end: nothing to read
        return EpochInput(backend=backend, iterator=None, steps=0, max_steps=0, masked=padded, element_spec=spec)
    pad_to = run_steps if padded and highest > lowest else None
    if pad_to is not None:
        fn = lambda ctx: _skipped(build(ctx, pad_to_steps=pad_to), ctx, skip_steps)  # noqa: E731
    else:
        fn = lambda ctx: _skipped(build(ctx), ctx, skip_steps)  # noqa: E731
    make = lambda: backend.distribute_dataset(fn, global_batch_size=global_batch_size)  # noqa: E731
    if pipelines is None or source is None:
        pipeline = make()
    else:  # the pipeline depends on these alone (the epoch only through a shuffle seed)
        key = (global_batch_size, remainder, seed, None if seed is None else epoch, pad_to, skip_steps)
        pipeline = pipelines.get(data, key, make)
    iterator = iter(pipeline)
    return EpochInput(backend=backend, iterator=iterator, steps=remaining, max_steps=remaining, masked=padded,
                      element_spec=spec)


def _skipped(dataset: tf.data.Dataset, context: InputContext, steps: int) -> tf.data.Dataset:
    """``dataset`` (per-replica batches) without its first ``steps`` step inputs. The skipped batches
    are still read (not trained on): the position comes from the step count, never from an iterator."""
    if not steps:
        return dataset
    return dataset.skip(steps * context.replicas_per_pipeline)
