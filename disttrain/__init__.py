"""disttrain: write a tf.GradientTape step once, run it on one device, Mirrored, MultiWorker or Horovod.

    import disttrain as dt
    backend = dt.get_backend("auto")          # first thing in the program
    with backend.scope():
        model = ...; optimizer = ...
    trainer = dt.Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend)
    trainer.fit(dataset, global_batch_size=64, epochs=5)
"""

from disttrain.backends import Backend, GradientOptions, InputContext, detect, get_backend
from disttrain.callbacks import Callback, current_learning_rate
from disttrain.checkpoint import Checkpointing
from disttrain.drift import DriftError
from disttrain.nonfinite import NonFiniteError
from disttrain.preemption import PREEMPTION_EXIT_CODE, Preempted
from disttrain.step_context import StepContext
from disttrain.trainer import Trainer
from disttrain.watchdog import STALL_EXIT_CODE
from disttrain.progress import JsonLinesLogger, ProgressBar
from disttrain.summaries import TensorBoard
from disttrain import data, lr, metrics, shards, summaries  # noqa: E402  (submodules as dt.data, dt.lr, ...)

__version__ = "0.1.0"

__all__ = ["GradientOptions", "data", "lr", "metrics", "shards", "summaries", "Backend", "Callback", "Checkpointing", "DriftError", "NonFiniteError", "PREEMPTION_EXIT_CODE", "STALL_EXIT_CODE", "Preempted", "InputContext", "JsonLinesLogger", "ProgressBar", "StepContext", "TensorBoard",
           "Trainer", "current_learning_rate", "detect", "get_backend", "__version__"]
