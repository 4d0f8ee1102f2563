"""Runs every benchmark in bench/ (each prints a Markdown section) and writes docs/benchmarks.md.

    python bench/run.py --out docs/benchmarks.md      # what `make bench` does
    python bench/run.py --only overhead               # one benchmark, to stdout
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
HEADER = """# Benchmarks

Each section is one benchmark run: its configurations are measured interleaved in the same run and
reported as medians and as a ratio against the hand-written baseline (or the 'off' setting), so the
ratio is meaningful even on a noisy machine. Regenerate with `make bench`.

Machine: {machine}, {cores} cores, Python {python}; generated {date}.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the report here (default: stdout)")
    parser.add_argument("--only", action="append", default=None, help="run only bench/NAME.py")
    args = parser.parse_args(argv)
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name != "run.py" and not p.name.startswith("_"))
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    sections, failed = [], []
    for script in scripts:
        print(f"[bench] {script.name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
        if proc.returncode:
            failed.append(script.name)
            sections.append(f"## {script.stem}\n\nFAILED (exit {proc.returncode}):\n\n```\n{proc.stderr[-2000:]}\n```\n")
        else:
            sections.append(proc.stdout.strip() + "\n")
    report = HEADER.format(machine=platform.machine(), cores=os.cpu_count(), python=platform.python_version(),
                           date=datetime.date.today().isoformat()) + "\n" + "\n".join(sections)
    if args.out:
        Path(args.out).write_text(report)
        print(f"[bench] wrote {args.out}", file=sys.stderr)
    else:
        print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
