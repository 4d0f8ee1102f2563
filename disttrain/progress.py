"""Progress reporting on the chief: a progress bar for people, a JSON-lines log for machines.

Both consume the trainer's globally reduced step and epoch logs, so what rank 0 shows is the global
run, and both are silent on every other process. For batch jobs use ``Trainer(verbose=0)`` (nothing
printed) or ``verbose=1`` (one line per epoch), and a :class:`JsonLinesLogger` for the numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import IO, Any, Mapping

import keras

from disttrain.callbacks import Callback


def format_logs(logs: Mapping[str, float], *, skip: tuple = ()) -> str:
    """``loss 0.1234 - acc 0.9 - lr 0.01 - 5120 ex/s`` (4 significant digits)."""
    parts = []
    for name, value in logs.items():
        if name in skip or name == "step_time":
            continue
        if name == "examples_per_sec":
            parts.append(f"{value:.0f} ex/s")
        else:
            parts.append(f"{name} {value:.4g}")
    return " - ".join(parts)


def epoch_line(*, epoch: int, epochs: int, logs: Mapping[str, float], seconds: float, untimed: float) -> str:
    """``epoch 2/5 - loss 0.1234 - lr 0.01 - 3.21s (5120 examples/s)``: the line ``Trainer(verbose=1)`` prints.

    Args:
      epoch: The epoch's index (0-based).
      epochs: The run's last epoch number (``initial_epoch + epochs``).
      logs: The epoch's logs (with ``examples_per_sec``).
      seconds: The timed seconds of its steps.
      untimed: The seconds of the calls that traced, left out of the throughput (0: none).
    """
    shown = " - ".join(f"{k} {v:.4g}" for k, v in logs.items() if k not in ("examples_per_sec", "step_time"))
    timing = f"examples/s, without {untimed:.2f}s of tracing" if untimed else "examples/s"
    return f"epoch {epoch + 1}/{epochs} - {shown} - {seconds + untimed:.2f}s ({logs['examples_per_sec']:.0f} {timing})"


class ProgressBar(Callback):
    """A progress bar on the chief, updated at every step-log (``Trainer(log_every_steps=N)``).

    On a terminal it is ``keras.utils.Progbar`` (the bar ``model.fit`` draws), redrawn in place with
    the running global values, which it shows as they are (they are already means over the epoch).
    When the output is a file or a pipe (batch jobs, logs), where a redrawn bar would leave control
    characters, each update is one plain line instead: ``epoch 1/5 40/100 - loss 0.1234 - ...``.
    Other processes print nothing. ``Trainer(verbose=2)`` adds one.

    Args:
      stream: Where to write (default ``sys.stdout`` at write time).
      dynamic: Draw the Keras bar in place; default: when ``stream`` is a terminal.
    """

    def __init__(self, *, stream: IO[str] | None = None, dynamic: bool | None = None):
        self.stream, self.dynamic = stream, dynamic
        self._start = 0.0
        self._epochs = 0
        self._bar: keras.utils.Progbar | None = None

    def _out(self) -> IO[str]:
        return self.stream or sys.stdout

    def _is_dynamic(self) -> bool:
        if self.dynamic is not None:
            return self.dynamic
        return bool(getattr(self._out(), "isatty", lambda: False)())

    def _show(self, trainer, done: int, logs: Mapping[str, float], *, final: bool) -> None:
        out = self._out()
        if not self._is_dynamic():
            total = trainer.position.epoch_steps or "?"  # None: a pipeline of unknown length
            end = f" - {time.perf_counter() - self._start:.1f}s" if final else ""
            out.write(f"epoch {trainer.position.epoch + 1}/{self._epochs} {done}/{total} - {format_logs(logs)}{end}\n")
            out.flush()
            return
        if self._bar is None:
            out.write(f"Epoch {trainer.position.epoch + 1}/{self._epochs}\n")
            self._bar = keras.utils.Progbar(trainer.position.epoch_steps, interval=0, stateless_metrics=())
        values = [(name, value) for name, value in logs.items() if name != "step_time"]
        with contextlib.redirect_stdout(out):  # Progbar writes to sys.stdout
            self._bar.update(done, values=values, finalize=final)
        if final:
            self._bar = None

    def on_train_begin(self, trainer) -> None:
        config = trainer.fit_config
        self._epochs = config.get("initial_epoch", 0) + config.get("epochs", 0)

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        self._start = time.perf_counter()
        self._bar = None

    def on_step_logs(self, trainer, step: int, logs: dict[str, float]) -> None:
        if not trainer.backend.is_chief:
            return
        done, total = trainer.position.epoch_step, trainer.position.epoch_steps
        if total is not None and done >= total:  # the epoch line follows at once
            return
        self._show(trainer, done, logs, final=False)

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        if not trainer.backend.is_chief:
            return
        self._show(trainer, trainer.position.epoch_steps, logs, final=True)


class JsonLinesLogger(Callback):
    """Appends one JSON object per line to ``path`` on the chief: the run config, step logs, epochs.

    Lines: ``{"event": "config", ...}`` at the start of ``fit``, ``{"event": "step", "step": s,
    "epoch": e, ...logs}`` at every step-log, ``{"event": "epoch", "epoch": e, "step": s, ...logs}``
    after every epoch (the values of ``trainer.history``). Each line also has ``time`` (Unix seconds).

    Args:
      path: File to write (its directory is created by the chief). Other processes write nothing.
      append: Append to an existing file instead of replacing it.
    """

    def __init__(self, path: str, *, append: bool = False):
        self.path = os.fspath(path)
        self.append = append
        self._file: IO[str] | None = None
        self._opened = False

    def _emit(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({**record, "time": time.time()}) + "\n")
            self._file.flush()

    def on_train_begin(self, trainer) -> None:
        if not trainer.backend.is_chief:
            return
        if self._file is None:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "a" if (self.append or self._opened) else "w")
            self._opened = True
        self._emit({"event": "config", **trainer.run_config()})

    def on_step_logs(self, trainer, step: int, logs: dict[str, float]) -> None:
        self._emit({"event": "step", "step": step, "epoch": trainer.position.epoch, **logs})

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        self._emit({"event": "epoch", "epoch": epoch, "step": trainer.position.global_step, **logs})

    def on_train_end(self, trainer, logs: dict[str, float]) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
