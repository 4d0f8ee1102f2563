"""A worker's side of an elastic launch (``disttrain launch --min-workers M --max-workers N``).

The launcher starts every formation of the job with ``DISTTRAIN_ELASTIC_EVENT`` set to a JSON object:
why this formation exists (``reason``), the world sizes before and now (``old_size``, ``new_size``), its
number (``formation``, 1 for the first) and when the event happened (``time``, the launcher's
``time.time()``). A :class:`disttrain.Checkpointing` session of such a worker (see
:mod:`disttrain.checkpoint`) makes one of these:

* when it is created, the chief prints ``disttrain elastic: checkpointing to DIR ...`` on stderr: the
  launcher re-forms a job only after it has seen that line (without checkpoints a new formation could only
  start from scratch), and
* after the first step of the formation, the chief prints the re-formation: old and new world size, the
  global step it resumed at, and the seconds from the event to that first step.

Nothing here imports TensorFlow: the launcher uses the same names.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

#: The variable holding the formation's event (set by the elastic launcher).
EVENT_ENV = "DISTTRAIN_ELASTIC_EVENT"
#: How the chief's report that it checkpoints starts (the launcher looks for it).
REPORT_PREFIX = "disttrain elastic: checkpointing to "


def encode_event(*, reason: str, old_size: int, new_size: int, formation: int, at: float) -> str:
    """The value of :data:`EVENT_ENV` for a formation."""
    return json.dumps({"reason": reason, "old_size": old_size, "new_size": new_size, "formation": formation,
                       "time": at})


def read_event(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The formation's event, or None outside an elastic launch.

    Raises:
      ValueError: If the variable is set but is not such a JSON object (quoting it).
    """
    raw = (os.environ if env is None else env).get(EVENT_ENV)
    if not raw:
        return None
    try:
        event = json.loads(raw)
        _ = (str(event["reason"]), int(event["old_size"]), int(event["new_size"]), int(event["formation"]),
             float(event["time"]))
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{EVENT_ENV}={raw[:200]!r} is not an elastic event (it is set by `disttrain launch "
                         "--min-workers/--max-workers`); unset it") from None
    return event


class ElasticReport:
    """Prints what an elastic launcher needs to know, on the chief only.

    Args:
      event: The formation's event (:func:`read_event`).
      is_chief: True on rank 0 (the only process that prints).
      directory: The checkpoint directory.
      every_steps: ``Checkpointing(every_steps=...)``: what a lost worker can cost at most.
    """

    def __init__(self, *, event: dict[str, Any], is_chief: bool, directory: str, every_steps: int | None):
        self.event, self.is_chief = event, is_chief
        self._reported_step = False
        if is_chief:
            bound = (f"a lost worker costs at most {every_steps - 1} step(s) done again" if every_steps
                     else "no every_steps: a lost worker costs every step since the last save")
            _print(f"{REPORT_PREFIX}{directory} (every_steps={every_steps}; {bound})")

    def after_step(self, *, step: int, resumed_step: int | None, size: int) -> None:
        """Called after every train step; prints the formation's line once, after its first step."""
        if self._reported_step:
            return
        self._reported_step = True
        if not self.is_chief:
            return
        event = self.event
        seconds = time.time() - float(event["time"])
        where = f"resumed at global step {resumed_step}" if resumed_step is not None else "started from scratch"
        if int(event["formation"]) == 1:
            _print(f"disttrain elastic: formation 1: {size} worker(s), {where}; first step (global step {step}) "
                   f"done {seconds:.1f}s after the launch")
            return
        _print(f"disttrain elastic: re-formed {event['old_size']} -> {size} worker(s) (formation "
               f"{event['formation']}) after {event['reason']}; {where}; first step (global step {step}) done "
               f"{seconds:.1f}s after the event")


def from_env(*, is_chief: bool, directory: str, every_steps: int | None) -> ElasticReport | None:
    """An :class:`ElasticReport` inside an elastic launch, else None (see :class:`ElasticReport`)."""
    event = read_event()
    if event is None:
        return None
    return ElasticReport(event=event, is_chief=is_chief, directory=directory, every_steps=every_steps)


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
