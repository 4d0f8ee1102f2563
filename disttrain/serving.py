"""Saving a trained model for serving: written once, into one place, on every backend.

The variables are identical on every process after training, so one copy is enough; the chief writes it.
Under MultiWorkerMirroredStrategy a save may run collectives, so there every worker saves (the others
into a temporary directory, removed at once), as TensorFlow's multi-worker guide prescribes. Every
process returns only when the chief's copy is complete (a barrier), so any of them may load it next.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

#: Formats :func:`save_model` writes.
FORMATS = ("keras", "saved_model")


def format_of(path: str) -> str:
    """The format a path asks for: ``"keras"`` for a name ending in ``.keras``, else ``"saved_model"``.

    Args:
      path: The file (``.keras``) or directory (SavedModel) to write.

    Returns:
      One of :data:`FORMATS`.
    """
    return "keras" if str(path).endswith(".keras") else "saved_model"


def save_model(*, model: Any = None, backend: Any, path: str, overwrite: bool = False, models: Any = ()) -> str:
    """Writes ``model`` to ``path`` once, from the chief, and waits until every process may read it.

    Call it on every process, after training (``trainer.save_model(path)`` calls it).

    Args:
      model: A Keras model (trained with disttrain or not); default the only one of ``models``.
      backend: The run's backend (a :class:`disttrain.Backend`).
      path: A ``.keras`` file (``model.save``; load with ``keras.models.load_model``) or any other path: a
        TensorFlow SavedModel directory for serving (``model.export``: TF Serving, ``tf.saved_model.load``,
        whose ``serve`` function is the model's inference call). A directory every process can read.
      overwrite: Replace an existing ``path``; without it an existing one is an error.
      models: The trainer's models, to pick ``model`` from when it is not given.

    Returns:
      ``path``.

    Raises:
      ValueError: If ``model`` is not given and ``models`` does not hold exactly one.
      FileExistsError: If ``path`` exists and ``overwrite`` is False (raised on every process alike).
    """
    if model is None:
        if len(models) != 1:
            raise ValueError(f"save_model: the trainer has {len(models)} models "
                             f"({', '.join(m.name for m in models)}); pass model=the_one_to_save")
        model = models[0]
    path = str(path)
    exists = bool(backend.broadcast(int(os.path.exists(path)))) if backend.size > 1 else os.path.exists(path)
    if exists and not overwrite:
        raise FileExistsError(f"save_model: {path!r} exists; pass overwrite=True or choose a new path")
    temporary = None
    if backend.is_chief:
        target = path
        if exists:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
    elif backend.checkpoint_writer(path) is not None:  # its save is collective: this worker saves a throwaway copy
        temporary = tempfile.mkdtemp(prefix="disttrain-save-model-")
        target = os.path.join(temporary, os.path.basename(path.rstrip(os.sep)) or "model")
    else:
        target = None
    try:
        if target is not None:
            _write(model, target)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    backend.barrier()  # nobody loads (or exits) before the chief's copy is complete
    return path


def _write(model: Any, target: str) -> None:
    if format_of(target) == "keras":
        model.save(target)
    else:
        model.export(target, format="tf_saved_model", verbose=False)
