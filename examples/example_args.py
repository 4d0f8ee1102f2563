"""The command line every example shares, the backend it names, and the JSON record tests read."""

from __future__ import annotations

import argparse
import json
from typing import Any

BACKENDS = ["auto", "single", "mirrored", "multiworker", "horovod"]


def parser(description: str, *, epochs: int, global_batch: int | None = 64) -> argparse.ArgumentParser:
    """``--backend``, ``--cpu-replicas``, ``--epochs``, ``--global-batch`` and ``--history-json``; add an
    example's own options to it, then call ``parse_args()``.

    Args:
      description: The example's one-line description.
      epochs: Default of ``--epochs``.
      global_batch: Default of ``--global-batch``; None leaves the option out (the example derives it).
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--cpu-replicas", type=int, default=None, help="logical CPU devices (mirrored)")
    p.add_argument("--epochs", type=int, default=epochs)
    if global_batch is not None:
        p.add_argument("--global-batch", type=int, default=global_batch)
    p.add_argument("--history-json", default=None, help="write the history here (rank 0)")
    return p


def backend_of(args: argparse.Namespace):
    """The backend ``--backend`` names; call it before TensorFlow starts."""
    import disttrain as dt

    return dt.get_backend(args.backend, cpu_replicas=args.cpu_replicas)


def write_record(args: argparse.Namespace, backend, record: dict[str, Any]) -> None:
    """Rank 0 writes ``record`` (the history and what else the example reports) to ``--history-json``."""
    if args.history_json and backend.is_chief:
        with open(args.history_json, "w") as f:
            json.dump(record, f)
