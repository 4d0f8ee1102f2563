"""A real NaN in ONE replica's data at global step 3: on_nonfinite = raise / skip / ignore on every backend.

tests/workers/nonfinite.py runs the three modes and two references in turn, in one job of each backend's
shared launch (tests/shared_launches.py).
"raise" names the step and the rank and leaves the weights of the first two steps; "skip" skips the
update on every rank and ends bitwise where a run without that batch ends (weights, optimizer slots and
``iterations``); "ignore" lets the NaN into every rank's weights, as before. Every rank holds the same
bits in every case.
"""

import json
import re
import types

import numpy as np
import pytest

from disttrain import nonfinite
from shared_launches import TEST_TIMEOUT, job
from launchers import BACKENDS

# (rank, replica, replicas) that holds the NaN: the last replica's slice of the third batch
WHERE = {"single": (0, 0, 1), "mirrored": (0, 1, 2)}
DEFAULT_WHERE = (1, 1, 2)


def _weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_on_one_replica_is_raised_skipped_or_ignored_alike_on_every_rank(backend, tmp_path_factory):
    launched = job(backend, "nonfinite", tmp_path_factory)
    tmp_path = launched.out
    rank, replica, replicas = WHERE.get(backend, DEFAULT_WHERE)
    ranks = 1 if backend in WHERE else 2
    found = f"at global step 3 (epoch 1, step 3/8) on rank {rank} (replica {replica} of {replicas})"
    results = [json.loads((tmp_path / f"nonfinite_rank{r}.json").read_text()) for r in range(ranks)]
    weights = {case: [_weights(tmp_path / f"{case}_rank{r}.npz") for r in range(ranks)]
               for case in ("raise", "skip", "ignore", "without_bad_batch", "first_steps")}
    for case, per_rank in weights.items():  # every rank holds the same bits
        assert all(all(np.array_equal(a, b, equal_nan=True) for a, b in zip(per_rank[0], other))
                   for other in per_rank[1:]), f"{backend} {case}: ranks differ"

    for result in results:
        raised = result["raise"]
        assert raised["error"].startswith(
            f"non-finite loss and gradients {found}. Its update was not applied on any rank (the weights are those "
            "from before that step). Look for a NaN or Inf in that step's input on that rank"), raised["error"]
        assert "pass Trainer(on_nonfinite='skip')" in raised["error"]
        assert raised["steps"] == [3, 3] and raised["ranks"] == [rank] and raised["iterations"] == 2
        skipped = result["skip"]
        assert skipped["history"]["skipped_steps"] == [1.0] and skipped["history"]["skipped_fraction"] == [0.125]
        assert skipped["iterations"] == 7 and skipped["global_step"] == 8, skipped
        reference = result["without_bad_batch"]
        np.testing.assert_allclose(skipped["history"]["loss"], reference["history"]["loss"], rtol=1e-6)
        assert np.isnan(result["ignore"]["history"]["loss"][0]) and result["ignore"]["iterations"] == 8
    # raise: the first two steps' weights (and slots, and iterations); skip: bitwise the run without the batch
    assert all(np.array_equal(a, b) for a, b in zip(weights["raise"][0], weights["first_steps"][0]))
    assert all(np.array_equal(a, b) for a, b in zip(weights["skip"][0], weights["without_bad_batch"][0]))
    assert all(np.isfinite(w).all() for w in weights["skip"][0])
    assert any(np.isnan(w).any() for w in weights["ignore"][0])  # as before: NaN weights on every rank
    output = "".join(launched.stdout) + launched.launch.stderr
    assert output.count(f"disttrain: non-finite loss and gradients {found}: the update was skipped on every rank "
                        "(1 step(s) skipped so far)") == 1, output[-3000:]  # said once, by the chief
    print(f"{backend}: fit raised after {max(r['raise_seconds'] for r in results):.1f} s (3 steps, tracing included)")
    assert all(r["raise_seconds"] < 60 for r in results), [r["raise_seconds"] for r in results]


# -- in-process: the messages -------------------------------------------------------------------------
def _monitor(policy, *, replicas=4, local=2, printed=None):
    backend = types.SimpleNamespace(num_replicas=replicas, local_replicas=local, is_chief=True)
    return nonfinite.Monitor(policy=policy, backend=backend, print_fn=None if printed is None else printed.append)


def _flags(loss=(), grads=(), skipped=1.0, replicas=4):
    values = np.zeros(2 * replicas + 1)
    values[list(loss)] = 1
    values[[replicas + r for r in grads]] = 1
    values[-1] = skipped
    return {"loss": 1.0, nonfinite.FLAGS: values}


def test_raise_names_loss_and_gradients_apart_and_a_call_of_several_steps():
    with pytest.raises(nonfinite.NonFiniteError, match=re.escape(
            "non-finite loss on rank 1 (replica 3 of 4) and gradients on rank 0 (replica 0 of 4), rank 1 (replica 3 "
            "of 4) at one of global steps 5-8 (here)")) as err:
        _monitor("raise").after_call(_flags(loss=[3], grads=[0, 3]), first_step=5, count=4, where="here")
    assert err.value.steps == (5, 8) and err.value.ranks == [0, 1]
    with pytest.raises(nonfinite.NonFiniteError, match=r"in their sum over the replicas only: every replica's own "
                                                       r"loss and gradients were finite \(an overflow in the sum\)"):
        _monitor("raise").after_call(_flags(), first_step=5, count=1, where="here")


def test_skip_reports_on_the_chief_and_a_clean_step_passes():
    printed = []
    monitor = _monitor("skip", printed=printed)
    assert monitor.after_call(_flags(skipped=0.0), first_step=1, count=1, where="w") == {"loss": 1.0}
    for step in range(2, 13):
        assert monitor.after_call(_flags(grads=[2]), first_step=step, count=1, where="w") == {"loss": 1.0}
    assert monitor.skipped == 11 and len(printed) == 10  # the first ten, then every 100th
    assert printed[0] == ("disttrain: non-finite gradients on rank 1 (replica 2 of 4) at global step 2 (w): the update "
                          "was skipped on every rank (1 step(s) skipped so far)")
    assert printed[-1].endswith("(10 step(s) skipped so far) (from now on reported every 100th)")


def test_unknown_policy():
    with pytest.raises(ValueError, match=r"on_nonfinite='warn' is not supported; use one of 'raise', 'skip', 'ignore'"):
        nonfinite.check_policy("warn")


def test_the_finiteness_test_reads_sums_and_keeps_each_dtype_s_range():
    import tensorflow as tf

    nan, inf = float("nan"), float("inf")
    bad = lambda *values: float(nonfinite.is_bad(list(values)))  # noqa: E731
    assert bad(tf.constant(1.0), tf.ones([3, 3]), None) == 0.0
    assert bad(tf.constant(2.0), tf.constant([1.0, nan])) == 1.0
    assert bad(tf.constant([inf, -inf])) == 1.0  # a sum of +Inf and -Inf is NaN, still caught
    assert bad(tf.constant(-inf)) == 1.0  # a scalar (a loss) is its own sum
    assert bad(tf.constant([60000.0, 60000.0], tf.float16)) == 0.0  # finite, though its float16 sum is not
    assert bad(tf.constant([inf], tf.bfloat16)) == 1.0
    assert bad(tf.constant([1e300, 1e300], tf.float64)) == 0.0  # finite in float64, not in float32
    assert bad(tf.constant([nan], tf.float64), tf.constant(1.0)) == 1.0
    assert bad(tf.constant([1, 2]), None) == 0.0  # integers are never non-finite
