"""``get_backend("auto")`` reads the launcher's environment (real launches: tests/test_equivalence.py)."""

import pytest

from disttrain.backends import detect

# Variables the launchers really set (observed under horovodrun --gloo, mpirun / horovodrun --mpi,
# srun with PMIx, and disttrain launch --tf-config).
HOROVODRUN_GLOO = {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1",
                   "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_CONTROLLER": "gloo"}
MPIRUN = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
PMIX = {"PMIX_RANK": "3"}
TF_CONFIG = {"TF_CONFIG": '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}'}


@pytest.mark.parametrize("env,gpus,expected", [
    ({}, 0, "single"),
    ({}, 1, "single"),
    ({}, 2, "mirrored"),
    ({"DISTTRAIN_CPU_REPLICAS": "2"}, 0, "mirrored"),
    ({"DISTTRAIN_CPU_REPLICAS": "1"}, 0, "single"),
    (HOROVODRUN_GLOO, 0, "horovod"),
    (MPIRUN, 0, "horovod"),
    (PMIX, 4, "horovod"),
    (TF_CONFIG, 0, "multiworker"),
    (TF_CONFIG, 8, "multiworker"),
    ({**MPIRUN, **TF_CONFIG}, 0, "horovod"),  # an MPI launch wins over a stale TF_CONFIG
    ({"TF_CONFIG": ""}, 0, "single"),
])
def test_detect(env, gpus, expected):
    assert detect(env, num_gpus=gpus) == expected


def test_parse_tf_config_ranks_chief_first():
    from disttrain.backends.multiworker import parse_tf_config

    cluster = '{"cluster": {"chief": ["a:1"], "worker": ["a:2", "b:1", "b:2"]}, "task": {"type": "worker", "index": %d}}'
    assert parse_tf_config(cluster % 0) == (1, 4, 1)
    assert parse_tf_config(cluster % 2) == (3, 4, 1)
    assert parse_tf_config(cluster.replace('"type": "worker", "index": %d', '"type": "chief", "index": 0')) == (0, 4, 0)
    with pytest.raises(ValueError, match="task worker:7 is not a chief or worker"):
        parse_tf_config(cluster % 7)
    with pytest.raises(ValueError, match="TF_CONFIG is not valid"):
        parse_tf_config("{not json")
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        parse_tf_config("")
