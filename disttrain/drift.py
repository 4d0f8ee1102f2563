"""Replica drift check: are the weights still identical on every replica? One all-reduce every N steps.

    trainer = dt.Trainer(..., drift_check_every_steps=100)

Data parallelism relies on every replica applying the same update to the same weights. Anything that
changes a variable on some replicas only, outside ``ctx.apply_gradients``, silently breaks that: an
assign in a callback on one rank, ``horovod.tensorflow.keras.DistributedOptimizer`` on Keras 3 (it does
not average the gradients: the ranks train apart with no error), a variable updated from a per-rank
random value. Training goes on, each rank with its own model, and rank 0's checkpoint is only rank 0's.

Every N global steps (decided from the step count, so all processes check at the same step), each
process computes two checksums of every trainable variable and every optimizer variable, on each of its
local copies (a MirroredVariable has one per device): the sum of the values' bit patterns as integers,
and the same sum weighted by position (so a permutation also shows). Each process contributes the
maximum and minus the minimum over its copies, and ONE all-reduce (max) yields the largest and the
smallest checksum over every copy in the run; they agree for every variable when the replicas are in
sync. Otherwise every process raises :class:`DriftError` naming the first variable that differs and
each rank's checksum of it (one more all-reduce, only then).

Non-trainable model variables (e.g. BatchNorm moving statistics, which Horovod leaves per rank while
tf.distribute averages them) are not compared. The check reads every compared variable once: compiled,
it costs about one pass over the weights and a collective of 4 integers per variable.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

#: Words of 1, 2, 4 or 8 bytes are summed as 8-, 16- or 32-bit integers (8 bytes: two 32-bit words).
_WORDS = {1: tf.int8, 2: tf.int16, 4: tf.int32, 8: tf.int32}


class DriftError(RuntimeError):
    """Raised on every process when a variable differs between replicas (see :mod:`disttrain.drift`)."""


def _checksums(value: tf.Tensor) -> tf.Tensor:
    """``[sum of the bit-pattern words, position-weighted sum]`` of a tensor, as int64 (wrapping)."""
    if value.dtype == tf.bool:
        words = tf.cast(value, tf.int64)
    elif value.dtype.size in _WORDS and (value.dtype.is_floating or value.dtype.is_integer):
        words = tf.cast(tf.bitcast(value, _WORDS[value.dtype.size]), tf.int64)
    else:
        return tf.zeros([2], tf.int64)  # strings, resources: not compared
    words = tf.reshape(words, [-1])
    position = tf.range(1, tf.size(words, out_type=tf.int64) + 1) % 65_521 + 1
    return tf.stack([tf.reduce_sum(words), tf.reduce_sum(words * position)])


def _raw(variable: Any) -> Any:
    return variable if isinstance(variable, tf.Variable) else getattr(variable, "value", variable)


def variable_name(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


class DriftCheck:
    """Compares the checksums of ``variables`` over every replica (collective: all processes together).

    Args:
      backend: The backend.
      variables: The variables to compare (Keras or ``tf.Variable``; distributed ones per local copy).
      every_steps: Check after every so many global steps (0: never).

    Raises:
      ValueError: For a negative ``every_steps``.
    """

    def __init__(self, *, backend: Any, variables: Sequence[Any], every_steps: int):
        if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 0:
            raise ValueError(f"drift_check_every_steps={every_steps!r} must be an int >= 0 (0 turns the check off)")
        self.backend, self.every_steps = backend, every_steps
        self.variables = list(variables)
        self.names = [variable_name(v) for v in self.variables]
        copies = [backend.local_values(_raw(v)) for v in self.variables]
        self._copies = copies

        @tf.function
        def local_extremes() -> tf.Tensor:
            per_variable = [tf.stack([_checksums(tf.convert_to_tensor(c)) for c in cs]) for cs in copies]
            sums = tf.stack(per_variable)  # [variables, local copies, 2]
            return tf.concat([tf.reshape(tf.reduce_max(sums, 1), [-1]), -tf.reshape(tf.reduce_min(sums, 1), [-1])], 0)

        self._local_extremes = local_extremes

    def due(self, step: int) -> bool:
        """Whether to check after global step ``step`` (the same answer on every process)."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def check(self, *, where: str) -> None:
        """Raises :class:`DriftError` on every process if any compared variable differs between replicas.

        Args:
          where: The trainer's position, for the message (e.g. ``"after global step 40"``).
        """
        local = self._local_extremes()
        agreed = np.asarray(self.backend.all_reduce(local, "max"))
        half = agreed.size // 2
        highest, lowest = agreed[:half].reshape(-1, 2), -agreed[half:].reshape(-1, 2)
        differ = [i for i in range(len(self.variables)) if not np.array_equal(highest[i], lowest[i])]
        if not differ:
            return
        first = differ[0]
        per_rank = self._per_rank(np.asarray(local)[2 * first])  # this process's largest plain checksum of it
        shown = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(per_rank))
        local_note = ""
        if self.backend.local_replicas > 1:  # every process says what its own device copies hold
            mine = [int(_checksums(tf.convert_to_tensor(c))[0]) for c in self._copies[first]]
            local_note = f"; the largest over each process's copies; this rank's {len(mine)} device copies: {mine}"
        others = ", ".join(repr(self.names[i]) for i in differ[1:4]) + (" ..." if len(differ) > 4 else "")
        raise DriftError(
            f"replicas out of sync {where}: variable {self.names[first]!r} differs between replicas (checksum of "
            f"its bits {shown}{local_note}); {len(differ)} of the {len(self.variables)} compared variables differ{'s' if len(differ) == 1 else ''}"
            f"{' (also ' + others + ')' if others else ''}. Something changed variables on some replicas only, outside ctx.apply_gradients: e.g. an assign in a "
            "callback or step that runs on one rank, horovod.tensorflow.keras.DistributedOptimizer with Keras 3 "
            "(it does not average the gradients), or a per-rank random update. Change them through "
            "ctx.apply_gradients (or identically on every rank), and restart from a checkpoint saved before "
            "this step.")

    def _per_rank(self, value: int) -> np.ndarray:
        """Every process's ``value`` (one all-reduce of a one-hot vector)."""
        onehot = np.zeros([self.backend.size], np.int64)
        onehot[self.backend.rank] = value
        return np.asarray(self.backend.all_reduce(onehot, "sum"))
