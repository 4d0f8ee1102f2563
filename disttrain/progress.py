"""Progress reporting on the chief: a progress bar for people, a JSON-lines log for machines.

Both consume the trainer's globally reduced step and epoch logs, so what rank 0 shows is the global
run, and both are silent on every other process. For batch jobs use ``Trainer(verbose=0)`` (nothing
printed) or ``verbose=1`` (one line per epoch), and a :class:`JsonLinesLogger` for the numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any, Mapping

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


class ProgressBar(Callback):
    """A one-line progress bar on the chief, updated at every step-log (``Trainer(log_every_steps=N)``).

    On a terminal the line is redrawn in place; when the output is a file or pipe (batch jobs, logs)
    each update is a plain line instead, so logs stay readable. Other processes print nothing.
    ``Trainer(verbose=2)`` adds one.

    Args:
      stream: Where to write (default ``sys.stdout`` at write time).
      width: Characters of the bar itself.
      dynamic: Redraw in place; default: when ``stream`` is a terminal.
    """

    def __init__(self, *, stream: IO[str] | None = None, width: int = 24, dynamic: bool | None = None):
        self.stream, self.width, self.dynamic = stream, width, dynamic
        self._start = 0.0
        self._epochs = 0
        self._open_line = False

    def _out(self) -> IO[str]:
        return self.stream or sys.stdout

    def _is_dynamic(self) -> bool:
        if self.dynamic is not None:
            return self.dynamic
        out = self._out()
        return bool(getattr(out, "isatty", lambda: False)())

    def _write(self, text: str, *, final: bool) -> None:
        out = self._out()
        if self._is_dynamic():
            out.write("\r" + text + ("\n" if final else "\033[K"))
            self._open_line = not final
        else:
            out.write(text + "\n")
        out.flush()

    def on_train_begin(self, trainer) -> None:
        config = trainer.fit_config
        self._epochs = config.get("initial_epoch", 0) + config.get("epochs", 0)

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        self._start = time.perf_counter()

    def _bar(self, done: int, total: int) -> str:
        filled = int(self.width * done / total) if total else 0
        arrow = ">" if 0 < filled < self.width else ""
        return "[" + "=" * max(filled - len(arrow), 0) + arrow + "." * (self.width - filled) + "]"

    def on_step_logs(self, trainer, step: int, logs: dict[str, float]) -> None:
        if not trainer.backend.is_chief:
            return
        done, total = trainer.epoch_step, trainer.epoch_steps
        if total is not None and done >= total:  # the epoch line follows at once
            return
        where = f"{done}/{total} {self._bar(done, total)}" if total else f"{done}/?"  # None: unknown length
        self._write(f"epoch {trainer.epoch + 1}/{self._epochs} {where} {format_logs(logs)}", final=False)

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        if not trainer.backend.is_chief:
            return
        total = trainer.epoch_steps
        seconds = time.perf_counter() - self._start
        self._write(f"epoch {epoch + 1}/{self._epochs} {total}/{total} {self._bar(total, total)} "
                    f"{format_logs(logs)} - {seconds:.1f}s", final=True)


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
        self._emit({"event": "step", "step": step, "epoch": trainer.epoch, **logs})

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:
        self._emit({"event": "epoch", "epoch": epoch, "step": trainer.global_step, **logs})

    def on_train_end(self, trainer, logs: dict[str, float]) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
