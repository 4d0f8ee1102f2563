"""What every benchmark shares: interleaved pairs, ratio statistics, the load average, the result rows.

A benchmark measures its variants in alternating order within one process (or one launch), so noise
from other jobs hits both sides of a pair alike, and reports for each row the median, min and max of
the per-pair ratios (never a ratio of two separately taken medians), plus the load average while it ran.
Each row is also appended as JSON to ``$BENCH_RESULTS`` (when set) for ``bench/run.py``'s plot, and
single measured values (``measure``) go there too, for later benchmarks to read (``measurements``).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def synced_timer(backend, cpu: dict | None = None):
    """``synced(fn, calls, name=None)``: seconds per call of ``fn`` on the slower rank, ranks started
    together. With ``cpu`` and a ``name``, also appends to ``cpu[name]`` the CPU seconds per call that all
    ranks' processes used together (every thread: the step's, Horovod's, gloo's)."""

    def synced(fn, calls, name=None):
        backend.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        if cpu is not None and name is not None:
            cpu.setdefault(name, []).append(backend.all_reduce((time.process_time() - cpu_start) / calls, "sum"))
        return backend.all_reduce((time.perf_counter() - start) / calls, "max")

    return synced


def interleaved(variants: dict[str, Callable[[], float]], *, reps: int) -> dict[str, list[float]]:
    """Runs each variant ``reps`` times, rotating the order every repetition; returns the values it
    returned (e.g. seconds per step) by variant."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(variants[name]())
    return out


def epoch_times(epochs: dict[str, Callable[[], object]], *, steps: int, reps: int) -> tuple[dict, dict]:
    """Times one-epoch callables of ``steps`` steps each: one warm-up call each (tracing), then ``reps``
    interleaved repetitions. Returns ``(seconds per step by variant, median ms per step by variant)``."""
    for fn in epochs.values():
        fn()
    per_step = interleaved({k: (lambda fn=fn: timed(fn) / steps) for k, fn in epochs.items()}, reps=reps)
    return per_step, {k: sorted(v)[len(v) // 2] * 1e3 for k, v in per_step.items()}


def timed(fn: Callable[[], object], *, repeat: int = 1) -> float:
    """Seconds per call of ``fn`` over ``repeat`` calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-pair ratios (pair i = repetition i of both)."""
    return [a / b for a, b in zip(numerator, denominator)]


def spread(values: Sequence[float]) -> str:
    """``median (min-max)``."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def verdict(value: float, goal: str) -> str:
    """``meets`` / ``MISSES by x%`` for a goal written as ``<= 1.03`` or ``>= 0.9``."""
    op, target = goal.split()
    target = float(target)
    if (value <= target) if op == "<=" else (value >= target):
        return "meets"
    return f"MISSES by {abs(value / target - 1) * 100:.0f}%"


def record(row: str, pair_ratios: Sequence[float], goal: str | None) -> None:
    """Appends a row's ratios to ``$BENCH_RESULTS`` for the plot."""
    path = os.environ.get("BENCH_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"row": row, "ratios": list(pair_ratios), "goal": goal}) + "\n")


def measure(name: str, value: float, unit: str, what: str) -> None:
    """Appends one measured value (not a ratio row: the plot skips it) to ``$BENCH_RESULTS``, for a later
    benchmark (e.g. ``bench/scaling_model.py``) to read with ``measurements``.

    Args:
        name: a stable key, e.g. ``"P3 64 MiB bandwidth, Horovod path"``.
        value: the number, in ``unit``.
        unit: e.g. ``"GB/s"`` or ``"s"``.
        what: one line on how it was measured.
    """
    path = os.environ.get("BENCH_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"measurement": name, "value": float(value), "unit": unit, "what": what}) + "\n")


def measurements(path: str | None = None) -> dict[str, dict]:
    """The ``measure`` records of a results file (default ``$BENCH_RESULTS``) by name (the last one of a
    name wins); ``{}`` when there is no file."""
    path = path or os.environ.get("BENCH_RESULTS")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["measurement"]: r for r in records if "measurement" in r}


def ratio_table(rows: list[tuple[str, str, Sequence[float], str | None, str]]) -> list[str]:
    """Markdown rows ``| id | measurement | median (min-max) | goal | verdict | details |``; records each."""
    lines = ["| row | ratio of | per-pair ratio: median (min-max) | goal | verdict | details |",
             "|---|---|---|---|---|---|"]
    for row, what, values, goal, details in rows:
        record(row, values, goal)
        judged = verdict(statistics.median(values), goal) if goal else "-"
        lines.append(f"| {row} | {what} | {spread(values)} | {goal or '-'} | {judged} | {details} |")
    return lines


def command(script: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return f"python bench/{script}" + (" " + shlex.join(args) if args else "")


def worker_env(threads: int = 1) -> dict:
    """The environment of a launched benchmark worker (as the tests': 1 thread, quiet TensorFlow)."""
    env = dict(os.environ, DISTTRAIN_THREADS=str(threads), OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="2",
               TF_ENABLE_ONEDNN_OPTS="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for key in [k for k in env if k.startswith(("OMPI_", "PMIX_", "HOROVOD_")) or k == "TF_CONFIG"]:
        del env[key]
    return env
