"""disttrain: write a tf.GradientTape step once, run it on one device, Mirrored, MultiWorker or Horovod.

    import disttrain as dt
    backend = dt.get_backend("auto")          # first thing in the program
    with backend.scope():
        model = ...; optimizer = ...
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend)
    trainer.fit(dataset, global_batch_size=64, epochs=5)

The public names load on first use (PEP 562), so ``import disttrain`` and the ``disttrain`` command do
not pay for TensorFlow's import until something needs it. ``import disttrain`` keeps TensorFlow's C++
start-up notices out of the output (:mod:`disttrain.startup_logs`; ``DISTTRAIN_VERBOSE=1`` keeps them):
import it before TensorFlow. It also selects TensorFlow's pooling CPU allocator unless
``TF_CPU_ALLOCATOR_USE_BFC`` is set (:mod:`disttrain.allocator`: a 64 MiB all-reduce 1.7x faster).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from disttrain import allocator as _allocator
from disttrain import startup_logs as _startup_logs

_startup_logs.install()  # before anything loads TensorFlow: its start-up notices stay out of the output
_allocator.install()  # before the first CPU tensor: TensorFlow's pooling (BFC) CPU allocator, see allocator.py

__version__ = "0.1.0"

#: Public name -> module that defines it.
_NAMES = {
    "Backend": "disttrain.backends", "GradientOptions": "disttrain.backends", "InputContext": "disttrain.backends",
    "detect": "disttrain.backends", "get_backend": "disttrain.backends",
    "Callback": "disttrain.callbacks", "current_learning_rate": "disttrain.callbacks",
    "Checkpointing": "disttrain.checkpoint", "CheckpointError": "disttrain.checkpoint_files",
    "CollectiveError": "disttrain.backends.failures",
    "DriftError": "disttrain.drift", "NonFiniteError": "disttrain.nonfinite", "STALL_EXIT_CODE": "disttrain.watchdog",
    "PREEMPTION_EXIT_CODE": "disttrain.preemption", "Preempted": "disttrain.preemption",
    "StepContext": "disttrain.loop.step_context",
    "Trainer": "disttrain.trainer",
    "JsonLinesLogger": "disttrain.progress", "ProgressBar": "disttrain.progress",
    "TensorBoard": "disttrain.summaries",
}
#: Submodules reachable as ``dt.data``, ``dt.lr``, ... -> the module that is it (``disttrain/data.py`` and
#: ``disttrain/shards.py`` make ``import disttrain.data`` give that same module).
_SUBMODULES = {"data": "disttrain.input.data", "lr": "disttrain.lr", "metrics": "disttrain.metrics",
               "serving": "disttrain.serving", "shards": "disttrain.input.shards", "summaries": "disttrain.summaries"}

__all__ = sorted([*_NAMES, *_SUBMODULES, "__version__"])


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    else:
        raise AttributeError(f"module 'disttrain' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from disttrain import lr, metrics, serving, summaries  # noqa: F401
    from disttrain.input import data, shards  # noqa: F401
    from disttrain.backends import Backend, GradientOptions, InputContext, detect, get_backend  # noqa: F401
    from disttrain.callbacks import Callback, current_learning_rate  # noqa: F401
    from disttrain.backends.failures import CollectiveError  # noqa: F401
    from disttrain.checkpoint import Checkpointing  # noqa: F401
    from disttrain.checkpoint_files import CheckpointError  # noqa: F401
    from disttrain.drift import DriftError  # noqa: F401
    from disttrain.nonfinite import NonFiniteError  # noqa: F401
    from disttrain.watchdog import STALL_EXIT_CODE  # noqa: F401
    from disttrain.preemption import PREEMPTION_EXIT_CODE, Preempted  # noqa: F401
    from disttrain.progress import JsonLinesLogger, ProgressBar  # noqa: F401
    from disttrain.loop.step_context import StepContext  # noqa: F401
    from disttrain.summaries import TensorBoard  # noqa: F401
    from disttrain.trainer import Trainer  # noqa: F401
