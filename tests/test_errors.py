"""User mistakes get errors that say what is wrong and how to fix it."""

import json
import sys

import pytest

from launchers import WORKERS, run


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "errors.json"
    run("mirrored", WORKERS / "errors.py", ["--out", str(out)], np=2, timeout=120)
    return json.loads(out.read_text())


def test_optimizer_created_outside_scope(messages):
    msg = messages["optimizer_outside"]
    assert msg.startswith("ValueError") and "optimizer Adam was created outside backend.scope()" in msg
    assert "create it inside `with backend.scope():`" in msg


def test_model_created_outside_scope(messages):
    msg = messages["model_outside"]
    assert msg.startswith("ValueError") and "created outside backend.scope()" in msg
    assert "build the model inside" in msg


def test_global_batch_not_divisible(messages):
    assert messages["indivisible_batch"] == (
        "ValueError: global batch 31 is not divisible by 2 replicas; use a multiple of 2 (e.g. 32)")


def test_bad_datasets(messages):
    assert "already batched (batch size 8" in messages["batched_dataset"]
    assert "remove the .batch(...) call (or call .unbatch())" in messages["batched_dataset"]
    assert messages["batch_larger_than_data"] == (
        "ValueError: global batch 128 is larger than the dataset (64 examples); use a global batch of at most 64, "
        "or remainder='pad'")


def test_unbuilt_model_and_missing_eval_step(messages):
    assert "has no variables yet" in messages["unbuilt_model"] and "keras.Input" in messages["unbuilt_model"]
    assert "eval_step" in messages["no_eval_step"]


def test_horovod_missing_names_the_install_command(monkeypatch):
    from disttrain.backends import horovod as horovod_backend

    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"Horovod .* not installed .*install it with `disttrain install-horovod`"):
        horovod_backend.import_horovod()


def test_unknown_backend_and_reduce_op():
    import disttrain as dt
    from disttrain.backends.base import check_reduce_op

    with pytest.raises(ValueError, match="unknown backend 'tpu'; use one of auto, single, mirrored"):
        dt.get_backend("tpu")
    with pytest.raises(ValueError, match="reduce op 'avg' is not supported; use one of sum, mean, max, min"):
        check_reduce_op("avg")
