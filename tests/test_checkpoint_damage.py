"""Damaged checkpoints, a full disk, an unusable directory: real files damaged, in process (single device).

Multi-process cases (Horovod and MultiWorker: the rank that failed, each rank's view) are in
tests/test_checkpoint_faults.py.
"""

import glob
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

import disttrain as dt
from disttrain import checkpoint_files
from test_checkpoint import backend, fit, make  # noqa: F401 - the module's fixture
from workers.disk_faults import FillDiskAt, fill

# 4 epochs of 3 steps, a checkpoint every 2 steps and when fit ends, keep 3.
EVERY, KEEP = 2, 3


def _train(backend, directory, **overrides):  # noqa: F811 - backend is the fixture
    trainer, model = make(backend, directory, every_steps=EVERY, keep=KEEP)
    fit(trainer, **overrides)
    return trainer, model


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _numbers(directory):
    return sorted(int(m.group(1)) for f in os.listdir(directory) if (m := re.match(r"ckpt-(\d+)\.index$", f)))


@pytest.fixture(scope="module")
def pristine(backend, tmp_path_factory):  # noqa: F811
    """Made once: a run stopped after epoch 2 (ckpt-2..ckpt-4: steps 4, 6 and fit's end at step 6) and
    the weights of the uninterrupted 4-epoch run."""
    root = tmp_path_factory.mktemp("pristine")
    _, reference = _train(backend, root / "reference")
    _train(backend, root / "ckpt", epochs=2)
    assert _numbers(root / "ckpt") == [2, 3, 4]
    return root / "ckpt", _weights(reference)


@pytest.fixture
def stopped_run(pristine, tmp_path):
    """A copy of the stopped run's directory, and the uninterrupted run's weights."""
    directory, reference = pristine
    shutil.copytree(directory, tmp_path / "ckpt")
    return tmp_path / "ckpt", reference


def _damage(directory, how):
    latest = directory / "ckpt-4"
    data = glob.glob(f"{latest}.data-*")[0]
    if how == "index deleted":
        os.remove(f"{latest}.index")
        return "its index file ckpt-4.index is missing"
    if how == "data truncated":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
        return "its data is truncated"
    if how == "data garbled":
        raw = bytearray(open(data, "rb").read())
        for i in range(0, len(raw), 7):
            raw[i] ^= 0x5A
        open(data, "wb").write(bytes(raw))
        return "its data is garbled (a CRC32C check failed"
    if how == "index garbled":
        raw = bytearray(open(f"{latest}.index", "rb").read())
        raw[len(raw) // 3: len(raw) // 3 + 40] = b"\x00" * 40
        open(f"{latest}.index", "wb").write(bytes(raw))
        return "ckpt-4"
    if how == "position garbled":  # the run's position (JSON) replaced by text of the same length
        raw = open(data, "rb").read()
        start = raw.index(b'{"format"')
        end = raw.index(b"}", raw.rindex(b'"writer"')) + 1
        raw = raw[:start] + b"x" * (end - start) + raw[end:]
        open(data, "wb").write(raw)
        return "ckpt-4"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["index deleted", "data truncated", "data garbled", "index garbled",
                                 "position garbled"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_that_loads(backend, stopped_run, capsys, how):  # noqa: F811
    directory, reference = stopped_run
    reason = _damage(directory, how)
    started = time.monotonic()
    trainer, model = _train(backend, directory)
    err = capsys.readouterr().err
    assert re.search(rf"WARNING: checkpoint {directory}/ckpt-4 does not load: .*{re.escape(reason)}", err), err
    assert f"WARNING: resuming from {directory}/ckpt-3 (global step 6), the newest checkpoint that loads, " \
           f"instead of {directory}/ckpt-4; their files are moved to {directory}/damaged/" in err, err
    assert f"resuming from {directory}/ckpt-3 at epoch 2, step 3 (global step 6)" in err, err
    # nothing lost: the run ends bitwise where the uninterrupted run ends
    for got, want in zip(model.get_weights(), reference):
        np.testing.assert_array_equal(got, want)
    assert trainer.global_step == 12
    # the damaged files are kept aside; rotation kept the newest KEEP, all of them loadable
    assert sorted(os.listdir(directory / "damaged"))[0].startswith("ckpt-4.")
    assert _numbers(directory) == [5, 6, 7]
    assert all(checkpoint_files.problem(str(directory / f"ckpt-{n}")) is None for n in (5, 6, 7))
    assert time.monotonic() - started < 60


def test_when_no_checkpoint_loads_the_run_stops_and_deletes_nothing(backend, stopped_run):  # noqa: F811
    directory, _ = stopped_run
    for n in (2, 3, 4):
        os.remove(directory / f"ckpt-{n}.index")
    before = sorted(os.listdir(directory))
    with pytest.raises(dt.CheckpointError, match=r"none of the 3 checkpoint\(s\) in .* loads \(ckpt-4: its index "
                                                  r"file ckpt-4.index is missing .*nothing was deleted"):
        _train(backend, directory)
    assert sorted(os.listdir(directory)) == before  # no fresh start, no rotation


def test_a_deleted_state_file_still_resumes_from_the_files(backend, stopped_run, capsys):  # noqa: F811
    directory, reference = stopped_run
    os.remove(directory / "checkpoint")
    _, model = _train(backend, directory)
    assert f"resuming from {directory}/ckpt-4 at the start of epoch 3" in capsys.readouterr().err
    for got, want in zip(model.get_weights(), reference):
        np.testing.assert_array_equal(got, want)


def test_a_save_that_does_not_read_back_never_counts(backend, stopped_run, monkeypatch):  # noqa: F811
    """The verification runs before the state file names the new checkpoint and before rotation."""
    directory, _ = stopped_run
    state = (directory / "checkpoint").read_text()

    verify = checkpoint_files.verify_save

    def truncated_then_verified(path):  # a disk that lost the data of the save just written
        data = glob.glob(f"{path}.data-*")[0]
        with open(data, "r+b") as f:
            f.truncate(10)
        verify(path)

    trainer, _ = make(backend, directory, every_steps=EVERY, keep=KEEP)
    monkeypatch.setattr(checkpoint_files, "verify_save", truncated_then_verified)
    with pytest.raises(dt.CheckpointError, match=r"rank 0 could not write checkpoint ckpt-5 to .*ckpt: checkpoint "
                                                  r".*ckpt-5 does not read back after its save: its data is truncated"):
        fit(trainer)
    assert (directory / "checkpoint").read_text() == state  # ckpt-4 is still the latest
    assert _numbers(directory) == [2, 3, 4]  # nothing rotated away, the bad ckpt-5 removed


def _mount_tmpfs(path, size):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")


def test_a_full_disk_names_the_directory_size_and_free_space_and_keeps_the_previous(backend, pristine, tmp_path):  # noqa: F811
    disk = tmp_path / "small"
    _mount_tmpfs(disk, "2m")
    directory = disk / "ckpt"
    try:
        # ckpt-1 at step 2; the disk fills after step 3; the save at step 4 fails
        trainer, _ = make(backend, directory, callbacks=[FillDiskAt(disk / "filler", 3)], every_steps=EVERY,
                          keep=KEEP)
        started = time.monotonic()
        with pytest.raises(dt.CheckpointError) as raised:
            fit(trainer)
        message = str(raised.value)
        assert re.search(rf"rank 0 could not write checkpoint ckpt-2 to {directory}: the disk is full \(a "
                         r"checkpoint takes about \d+\.\d KiB, \d+\.\d KiB free there\); free space there or give "
                         rf"Checkpointing a directory on a larger disk; the partial files were removed and the "
                         rf"previous checkpoint {directory}/ckpt-1 is intact", message), message
        assert time.monotonic() - started < 60
        assert _numbers(directory) == [1] and not glob.glob(str(directory / "ckpt-2*")), os.listdir(directory)
        os.remove(disk / "filler")
        _, model = _train(backend, directory)  # resumes from ckpt-1 and finishes
        for got, want in zip(model.get_weights(), pristine[1]):
            np.testing.assert_array_equal(got, want)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_found_before_the_first_step(backend, tmp_path):  # noqa: F811
    disk = tmp_path / "full"
    _mount_tmpfs(disk, "1m")
    try:
        fill(disk / "filler")
        trainer, _ = make(backend, disk / "ckpt", every_steps=EVERY, keep=KEEP)
        with pytest.raises(dt.CheckpointError, match=r"cannot be used by every process .*No space left on device"
                                                      r".*\n  rank 0: could not write the token: the disk is full\n"
                                                      r"free space there \(0\.0 KiB free there\)"):
            fit(trainer)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_an_unwritable_directory_is_found_before_the_first_step(backend, tmp_path):  # noqa: F811
    directory = tmp_path / "ro"
    _mount_tmpfs(directory, "1m")
    subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
    try:
        trainer, model = make(backend, directory / "ckpt", every_steps=EVERY, keep=KEEP)
        before = _weights(model)
        with pytest.raises(dt.CheckpointError, match=r"checkpoint directory .*ro/ckpt' cannot be used by every "
                                                      r"process \(this is rank 0 on .*OSError.*Read-only file system"
                                                      r".*\n  rank 0: could not write the token .*\nmake it writable"):
            fit(trainer)
        for got, want in zip(model.get_weights(), before):  # no step ran
            np.testing.assert_array_equal(got, want)
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)
