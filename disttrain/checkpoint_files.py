"""A checkpoint directory's files: which checkpoints exist, which load, a save verified, the damaged set aside.

:mod:`disttrain.checkpoint` decides *when* to save and *what* a checkpoint holds; this module knows the
files ``tf.train.CheckpointManager`` leaves in the directory (``checkpoint``, the state file, and
``ckpt-<n>.index`` + ``ckpt-<n>.data-<i>-of-<k>`` per checkpoint) and what can go wrong with them below
the training loop: a missing index, a truncated or garbled data file, a state file that names a
checkpoint that is gone, a full disk, a directory that is not writable or not shared by every process.

The rules (docs/checkpoints.md, "Damaged checkpoints"):

* The candidates are every checkpoint the state file lists **and** every ``ckpt-<n>`` with a file on
  disk, newest first: a checkpoint whose index was deleted is still seen (TensorFlow's
  ``latest_checkpoint`` returns None then, and a run silently started again at step 0).
* :func:`problem` is the cheap check (the index reads, lists every variable of its object graph, the
  data files hold at least the bytes of its numeric tensors, disttrain's position parses); restoring
  reads every tensor with its CRC32C, which finds garbled bytes.
* Damaged checkpoints newer than the one resumed from move to ``damaged/`` (kept for a look, never
  overwritten by the next save's number, never counted by rotation) and the state file is rewritten.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
from typing import Any, Callable, Iterable

import numpy as np
import tensorflow as tf

#: The manager's checkpoint name: ``<directory>/ckpt-<n>``.
PREFIX = "ckpt"
#: Where damaged checkpoints are moved, inside the checkpoint directory.
DAMAGED_DIR = "damaged"
#: The file the chief writes to check that every process sees the same, writable directory.
TOKEN_FILE = ".disttrain-directory-check"
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_NAME = re.compile(rf"^{PREFIX}-(\d+)(?:\.index|\.data-\d+-of-\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used: nothing in it loads, a save failed, or the processes do not
    share it. The message names the directory, the files and the fix."""


def number(path: str | None) -> int:
    """The save counter of ``.../ckpt-<n>`` (-1 for None).

    Raises:
      ValueError: For a name that is not ``ckpt-<n>``.
    """
    if path is None:
        return -1
    try:
        return int(path.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"unexpected checkpoint name {path!r}; disttrain's checkpoints are named ckpt-<n>"
                         ) from None


def candidates(directory: str) -> list[str]:
    """Every checkpoint of ``directory``, newest first: those the state file lists and those with files.

    A state file that does not parse is ignored (the files still count).
    """
    numbers: set[int] = set()
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError, UnicodeDecodeError) as err:  # text_format.ParseError is a ValueError
        print(f"disttrain: WARNING: the checkpoint state file {os.path.join(directory, 'checkpoint')} does not "
              f"parse ({_first_line(err)}); looking at the checkpoint files themselves", flush=True)
        state = None
    if state is not None:
        for path in [state.model_checkpoint_path, *state.all_model_checkpoint_paths]:
            name = os.path.basename(path)
            if re.fullmatch(rf"{PREFIX}-\d+", name):
                numbers.add(int(name.rsplit("-", 1)[1]))
    for name in (os.listdir(directory) if os.path.isdir(directory) else ()):
        match = _NAME.match(name)
        if match:
            numbers.add(int(match.group(1)))
    return [os.path.join(directory, f"{PREFIX}-{n}") for n in sorted(numbers, reverse=True)]


def files_of(path: str) -> list[str]:
    """The files of checkpoint ``path`` on disk (its index and data shards)."""
    return sorted(glob.glob(glob.escape(path) + ".index") + glob.glob(glob.escape(path) + ".data-*-of-*"))


def problem(path: str, *, parse: Callable[[str], Any] | None = None,
            parse_key: str | None = None) -> str | None:
    """Why checkpoint ``path`` cannot load, from its files alone (cheap: no tensor data is read), or None.

    Args:
      path: The checkpoint prefix, ``<directory>/ckpt-<n>``.
      parse: Called with the string tensor ``parse_key`` (disttrain's position); an exception is a problem.
      parse_key: The checkpoint key of that string.
    """
    index = path + ".index"
    if not os.path.exists(index):
        data = files_of(path)
        return (f"its index file {os.path.basename(index)} is missing" +
                (f" (its data {', '.join(os.path.basename(f) for f in data)} is there)" if data else ""))
    try:
        reader = tf.train.load_checkpoint(path)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError, RuntimeError) as err:
        return f"its index {os.path.basename(index)} does not read ({_first_line(err)})"
    shards = _shard_files(path)
    if isinstance(shards, str):
        return shards
    need = sum(int(np.prod(shape)) * dtypes[key].size for key, shape in shapes.items()
               if dtypes[key] != tf.string and key != _OBJECT_GRAPH_KEY)
    have = sum(os.path.getsize(f) for f in shards)
    if have < need:
        return (f"its data is truncated: {', '.join(os.path.basename(f) for f in shards)} hold {have} bytes, "
                f"its tensors need at least {need}")
    truncated = (f"its data is truncated: {', '.join(os.path.basename(f) for f in shards)} hold {have} bytes "
                 "and reading its tensors runs past the end")
    try:
        missing = _missing_keys(reader, shapes)
    except IndexError:  # TF 2.21's short read: "Read less bytes than requested"
        return truncated
    except tf.errors.OpError as err:
        return _garbled(err)
    except Exception as err:  # noqa: BLE001 - a garbled object graph raises protobuf's DecodeError
        return f"its object graph does not parse ({type(err).__name__}: {_first_line(err)})"
    if missing:
        return f"its index lacks {len(missing)} of the variables its object graph names (e.g. {missing[0]!r})"
    if parse is not None and parse_key is not None:
        if parse_key not in shapes:
            return f"it has no disttrain position ({parse_key!r}): not a disttrain checkpoint"
        try:
            parse(reader.get_tensor(parse_key).decode())
        except IndexError:
            return truncated
        except tf.errors.OpError as err:
            return _garbled(err)
        except Exception as err:  # noqa: BLE001 - any failure to read the position means it cannot resume
            return f"its disttrain position does not read ({type(err).__name__}: {_first_line(err)})"
    return None


def load_error(err: BaseException) -> str:
    """The reason a restore that raised ``err`` failed, in one line (CRC mismatch, short read, ...)."""
    if isinstance(err, IndexError):  # TF 2.21 reports a short read of a data file as an IndexError
        return f"its data is truncated (restoring it read past the end: {_first_line(err)})"
    if isinstance(err, tf.errors.OpError):
        return _garbled(err)
    return f"restoring it failed: {type(err).__name__}: {_first_line(err)}"


def _garbled(err: tf.errors.OpError) -> str:
    text = _first_line(err)
    if "checksum" in text.lower():
        return f"its data is garbled (a CRC32C check failed: {text})"
    return f"reading it failed ({type(err).__name__}: {text})"


#: What restoring a damaged checkpoint raises (a short read is a Python IndexError in TF 2.21).
LOAD_ERRORS = (tf.errors.OpError, IndexError, UnicodeDecodeError)


def set_aside(directory: str, paths: Iterable[str]) -> list[str]:
    """Moves the files of the checkpoints ``paths`` into ``<directory>/damaged/``; returns where they went."""
    moved = []
    target = os.path.join(directory, DAMAGED_DIR)
    for path in paths:
        for file in files_of(path):
            os.makedirs(target, exist_ok=True)
            destination = os.path.join(target, os.path.basename(file))
            os.replace(file, destination)
            moved.append(destination)
    return moved


def rewrite_state(directory: str, *, latest: str, older: Iterable[str]) -> None:
    """Rewrites the state file so that ``latest`` is the newest checkpoint and ``older`` (with files) the
    rest of the rotation, so ``keep`` counts only checkpoints that exist."""
    kept = [p for p in older if os.path.exists(p + ".index")]
    # The manager's own text format (CheckpointState), relative names as it writes them; written atomically.
    lines = [f'model_checkpoint_path: "{os.path.basename(latest)}"']
    rotation = [*kept, latest]
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in rotation]
    # The manager rotates only entries newer than last_preserved_timestamp: give each its index's time.
    times = [os.path.getmtime(p + ".index") for p in rotation]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in times]
    lines.append(f"last_preserved_timestamp: {min(times) - 1.0!r}")
    _write_atomically(os.path.join(directory, "checkpoint"), "\n".join(lines) + "\n")


def verify_save(path: str) -> None:
    """Checks a checkpoint just written before it counts as the latest (a ``CheckpointOptions`` write
    callback: raising here keeps the state file and the rotation as they were).

    Raises:
      CheckpointError: If it does not read back (see :func:`problem`).
    """
    reason = problem(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} does not read back after its save: {reason}")


def remove_partial(path: str) -> None:
    """Removes what a failed save of ``path`` left: its files and TensorFlow's ``<path>_temp`` directory."""
    for file in files_of(path):
        try:
            os.remove(file)
        except OSError:
            pass
    for temp in glob.glob(glob.escape(path) + "_temp*"):
        shutil.rmtree(temp, ignore_errors=True)


def describe_save_failure(*, path: str, err: BaseException, rank: int, previous: str | None,
                          variables_bytes: int, private: bool = False) -> str:
    """The one message for a save that failed: directory, rank, size, free space, the fix (``private``: the
    directory is this process's temporary copy inside the checkpoint directory)."""
    directory = os.path.dirname(path)
    free = _free(directory)
    size = (0 if private else _checkpoint_size(previous)) or variables_bytes
    text = _first_line(err)
    full = "No space left on device" in text or isinstance(err, tf.errors.ResourceExhaustedError)
    cause = "the disk is full" if full else text
    fix = ("free space there or give Checkpointing a directory on a larger disk" if full else
           "make the directory writable (or give Checkpointing another one)")
    if private:  # a MultiWorker worker's temporary copy, deleted after each save
        kept = f"the checkpoints in {os.path.dirname(directory)} are untouched"
    else:
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no previous checkpoint"
    return (f"rank {rank} could not write checkpoint {os.path.basename(path)} to {directory}: {cause} "
            f"(a checkpoint takes about {_size(size)}, {free}); {fix}; the partial files were removed "
            f"and {kept}")


#: What each process found when it looked for the chief's token (see :func:`check_directory`).
_VIEWS = {0: "sees the chief's token: the same directory", 1: "does not see the chief's token file",
          2: "sees another token there (another run's, or another directory of the same name)",
          3: "cannot read the token file", 4: "cannot write its own files there",
          5: "could not write the token (the directory is not writable)",
          6: "could not write the token: the disk is full"}


def check_directory(directory: str, *, backend: Any, writer_dir: str | None) -> None:
    """Checks, before the first step, that ``directory`` is writable and is the same directory on every
    process: the chief writes a random token there, every process reads it back, the chief removes it
    (collective: a broadcast of the token and one all-reduce of one integer per rank).

    Args:
      directory: The checkpoint directory.
      backend: The run's backend (its ``rank``, ``size``, ``is_chief`` and ``all_reduce``).
      writer_dir: Where this process writes during a save (None: it does not write).

    Raises:
      CheckpointError: On every process, with each rank's view, if a process cannot use the directory.
    """
    token_path = os.path.join(directory, TOKEN_FILE)
    token, own_error, full = 0, "", False
    if backend.is_chief:
        token = int.from_bytes(os.urandom(7), "big") + 1
        try:
            os.makedirs(directory, exist_ok=True)
            _write_atomically(token_path, str(token))
        except OSError as err:
            token, own_error = -1, f"{type(err).__name__}: {err}"
            full = err.errno == errno.ENOSPC
    token = int(backend.broadcast(np.array([token], np.int64))[0])  # the chief's (-1: it could not write)
    view = 0
    if backend.is_chief and own_error:
        view = 6 if full else 5
    elif not backend.is_chief and token != -1:
        try:
            with open(token_path) as f:
                view = 0 if f.read().strip() == str(token) else 2
        except FileNotFoundError:
            view = 1
        except OSError as err:
            view, own_error = 3, f"{type(err).__name__}: {err}"
        if view == 0 and writer_dir is not None and writer_dir != directory:
            try:
                os.makedirs(writer_dir, exist_ok=True)
                _write_atomically(os.path.join(writer_dir, TOKEN_FILE), "1")
                shutil.rmtree(writer_dir, ignore_errors=True)
            except OSError as err:
                view, own_error = 4, f"{type(err).__name__}: {err}"
    views = per_rank(backend, view)
    if backend.is_chief and not own_error:  # every process has read it: the directory is left as it was
        try:
            os.remove(token_path)
        except OSError:
            pass
    if not views.any():
        return
    import socket

    lines = [f"  rank {r}: {_VIEWS[int(v)]}" for r, v in enumerate(views)]
    mine = f" (this is rank {backend.rank} on {socket.gethostname()}, looking at {os.path.abspath(directory)}"
    mine += f": {own_error})" if own_error else ")"
    if int(views.max()) == 6:
        fix = f"free space there ({_free(directory)}) or give Checkpointing a directory on a larger disk"
    elif int(views.max()) == 5:
        fix = "make it writable or give Checkpointing another directory"
    else:
        fix = ("put it on a filesystem that every process shares (NFS, Lustre, GCS FUSE ...) and give every "
               "process the same path")
    raise CheckpointError(f"checkpoint directory {directory!r} cannot be used by every process{mine}:\n" +
                          "\n".join(lines) + f"\n{fix}")


def per_rank(backend: Any, value: int) -> np.ndarray:
    """Every process's ``value``, indexed by rank (collective: one all-reduce of ``size`` integers).

    Args:
      backend: The run's backend (its ``rank``, ``size`` and ``all_reduce``).
      value: This process's integer.

    Returns:
      An int64 array of ``size`` values, the same on every process.
    """
    values = np.zeros([backend.size], np.int64)
    values[backend.rank] = value
    return np.asarray(backend.all_reduce(values, "sum"))


def _write_atomically(path: str, text: str) -> None:
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _free(directory: str) -> str:
    try:
        return f"{_size(shutil.disk_usage(directory).free)} free there"
    except OSError:
        return "free space unknown"


def _checkpoint_size(path: str | None) -> int:
    return sum(os.path.getsize(f) for f in files_of(path)) if path else 0


def _missing_keys(reader: Any, shapes: dict) -> list[str]:
    """Checkpoint keys the object graph names that the index does not list."""
    if _OBJECT_GRAPH_KEY not in shapes:
        return [_OBJECT_GRAPH_KEY]
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
    keys = [a.checkpoint_key for node in graph.nodes for a in node.attributes]
    return [k for k in keys if k not in shapes]


def _shard_files(path: str) -> list[str] | str:
    """The data shards ``path.data-<i>-of-<k>``, or why they are incomplete."""
    shards = glob.glob(glob.escape(path) + ".data-*-of-*")
    if not shards:
        return f"its data file {os.path.basename(path)}.data-00000-of-00001 is missing"
    total = int(shards[0].rsplit("-of-", 1)[1])
    wanted = [f"{path}.data-{i:05d}-of-{total:05d}" for i in range(total)]
    absent = [os.path.basename(f) for f in wanted if not os.path.exists(f)]
    if absent:
        return f"its data file {absent[0]} is missing"
    return wanted


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
