"""Runs every benchmark in bench/ (each prints a Markdown section) and writes docs/benchmarks.md and a
plot of every row's per-pair ratios next to it (docs/benchmarks.png).

    python bench/run.py --out docs/benchmarks.md      # what `make bench` does
    python bench/run.py --only p1_step_time           # one benchmark, to stdout
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# the rows first (P1..P6), then anything else in bench/
ORDER = ["p1_step_time", "p2_keras_fit", "p3_allreduce", "p4_weak_scaling", "scaling_model", "input_pipeline",
         "p6_startup", "summaries"]  # scaling_model reads what p3 and p4 measured
HEADER = """# Benchmarks

Each section is one benchmark run: its variants are measured interleaved (alternating, order rotating)
in the same run, and each row reports the median, min and max of the per-pair ratios (repetition i of
one side over repetition i of the other), the goal, and the load average while it ran — a row measured
at a load above the core count is noise, not a result. Regenerate with `make bench` on a quiet machine
(`uptime` first). Where a row misses its goal, [what the rows say](#what-the-rows-say) explains why.

Machine: {machine}, {cores} cores, Python {python}; generated {date} in {minutes:.1f} minutes
(by benchmark: {each}); load average before: {load}.

![per-pair ratios of every row, with its goal](benchmarks.png)
"""


def plot(results: list[dict], path: Path) -> None:
    """One line per row: its per-pair ratios as dots, the median as a bar, the goal as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.32 * len(results) + 1.2))
    for y, row in enumerate(reversed(results)):
        ratios = sorted(row["ratios"])
        ax.plot(ratios, [y] * len(ratios), "o", color="tab:blue", alpha=0.5, markersize=4)
        ax.plot([statistics.median(ratios)] * 2, [y - 0.3, y + 0.3], color="tab:blue", linewidth=2)
        if row.get("goal"):
            op, value = row["goal"].split()
            ax.plot([float(value)], [y], marker="<" if op == "<=" else ">", color="tab:red", markersize=7)
    ax.set_yticks(range(len(results)), [r["row"] for r in reversed(results)], fontsize=7)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("per-pair ratio (dots), median (bar), goal (red: which side of it is good)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the report here (default: stdout)")
    parser.add_argument("--only", action="append", default=None, help="run only bench/NAME.py")
    args = parser.parse_args(argv)
    scripts = sorted((p for p in BENCH.glob("*.py") if p.name != "run.py" and not p.name.startswith("_")),
                     key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    results = Path(tempfile.mkstemp(prefix="disttrain-bench-", suffix=".jsonl")[1])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", BENCH_RESULTS=str(results))
    sections, failed = [], []
    start, load = time.perf_counter(), " / ".join(f"{v:.1f}" for v in os.getloadavg()[:2])
    minutes = {}
    for script in scripts:
        print(f"[bench] {script.name} ...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
        minutes[script.stem] = (time.perf_counter() - began) / 60
        if proc.returncode:
            failed.append(script.name)
            sections.append(f"## {script.stem}\n\nFAILED (exit {proc.returncode}):\n\n```\n{proc.stderr[-2000:]}\n```\n")
        else:
            sections.append(proc.stdout.strip() + "\n")
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [r for r in records if "ratios" in r]  # _common.measure() records are single values, not rows
    results.unlink()
    notes = BENCH / "notes.md"
    report = HEADER.format(machine=platform.machine(), cores=os.cpu_count(), python=platform.python_version(),
                           date=datetime.date.today().isoformat(), minutes=(time.perf_counter() - start) / 60,
                           load=load, each=", ".join(f"{k} {v:.1f}" for k, v in minutes.items())) + "\n" + "\n".join(sections) + ("\n" + notes.read_text() if notes.exists() else "")
    if args.out:
        Path(args.out).write_text(report)
        if rows:
            plot(rows, Path(args.out).with_suffix(".png"))
        print(f"[bench] wrote {args.out}", file=sys.stderr)
    else:
        print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
