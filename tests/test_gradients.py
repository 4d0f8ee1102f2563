"""Gradient reduction options, buckets and Horovod's start-up settings (in-process, no launches).

The reductions themselves (compressed sums, single application, buckets) run on every backend in
tests/test_equivalence.py.
"""

import pytest
import tensorflow as tf

import disttrain as dt
from disttrain.backends import gradients
from disttrain.backends.horovod import horovod_env


def test_buckets_run_last_tensor_first_and_close_at_the_size():
    tensors = [tf.zeros([256]), tf.zeros([10]), tf.zeros([512]), tf.zeros([64])]  # 1024, 40, 2048, 256 bytes
    assert gradients.buckets(tensors, 0) == [[0, 1, 2, 3]]
    assert gradients.buckets(tensors, 1024) == [[3, 2], [1, 0]]
    assert gradients.buckets(tensors, 100) == [[3], [2], [1, 0]]
    assert gradients.buckets([], 100) == []


def test_options_are_checked():
    with pytest.raises(ValueError, match="compression 'int8' is not supported; use one of 'none', 'fp16', 'bf16'"):
        dt.GradientOptions(compression="int8")
    with pytest.raises(ValueError, match=r"bucket_mb=-1 must be >= 0"):
        dt.GradientOptions(bucket_mb=-1)


def test_one_replica_sends_nothing_and_casts_nothing():
    grads = [tf.constant([1.0001, 2.0]), None]
    out = gradients.reduce_gradients(grads, options=dt.GradientOptions(compression="fp16"), num_replicas=1,
                                     sum_bucket=lambda bucket: pytest.fail("no collective with one replica"))
    assert out[1] is None and out[0] is grads[0]


def test_compressed_buckets_come_back_in_their_own_dtype_and_place():
    seen = []

    def fake_sum(bucket):  # records what goes on the wire; "sums" two identical replicas
        seen.append([t.dtype for t in bucket])
        return [t + t for t in bucket]

    grads = [tf.constant([1.0001, 3.0]), None, tf.constant([[0.1]], tf.float64), tf.constant([7], tf.int32)]
    out = gradients.reduce_gradients(grads, options=dt.GradientOptions(compression="fp16", bucket_mb=1e-6),
                                     num_replicas=2, sum_bucket=fake_sum)
    assert seen == [[tf.int32], [tf.float16], [tf.float16]]  # last first; one tensor per bucket here
    assert out[1] is None and [g.dtype for g in (out[0], out[2], out[3])] == [tf.float32, tf.float64, tf.int32]
    assert out[0].numpy().tolist() == [2.0, 6.0]  # 1.0001 does not survive fp16: 1.0 + 1.0
    assert out[3].numpy().tolist() == [14]


def test_horovod_settings_become_its_environment():
    assert horovod_env() == {}
    assert horovod_env(fusion_threshold_mb=64, cycle_time_ms=2.5) == {
        "HOROVOD_FUSION_THRESHOLD": str(64 << 20), "HOROVOD_CYCLE_TIME": "2.5"}
    assert horovod_env(fusion_threshold_mb=0) == {"HOROVOD_FUSION_THRESHOLD": "0"}
    with pytest.raises(ValueError, match="fusion_threshold_mb=-1 must be >= 0"):
        horovod_env(fusion_threshold_mb=-1)
    with pytest.raises(ValueError, match="cycle_time_ms=0 must be > 0"):
        horovod_env(cycle_time_ms=0)
