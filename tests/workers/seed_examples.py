"""Runs the seed programs, the GAN and the two ports (docs/porting.md) one after another in ONE launch,
each exactly as ``python examples/X.py`` would (its ``__main__`` block, with its own argv; an exit status 0
ends only that program), so the examples tests pay for one TensorFlow start-up and one backend per
launcher instead of one per program.

    python tests/workers/seed_examples.py --backend B [--cpu-replicas N] --out-dir DIR

Each program writes ``DIR/<program>.json`` (its ``--history-json``); before each one rank 0 prints a line
``=== seed example <program>`` so the test can cut the output into the programs' own.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROGRAMS = ["linear_regression.py", "linear_regression_mae.py", "linear_regression_lr_cut.py", "sum_of_two.py",
            "gan.py", "custom_training.py", "synthetic_benchmark.py"]
#: A program's own arguments, given the output directory and the replica count (kept to a few seconds each).
EXTRA = {
    "gan.py": lambda out, replicas: ["--save-dir", str(out / "gan_saved")],
    # the tutorial's batch is per replica: the same global batch (64) on every backend, to compare
    "custom_training.py": lambda out, replicas: ["--batch-per-replica", str(64 // replicas), "--epochs", "2"],
    "synthetic_benchmark.py": lambda out, replicas: ["--epochs", "3", "--num-warmup-batches", "2",
                                                     "--num-batches-per-iter", "5", "--batch-size", "8"],
}
MARKER = "=== seed example "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--cpu-replicas", type=int, default=None)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(EXAMPLES))
    import disttrain as dt

    # the programs' own get_backend calls (same options) return this backend
    backend = dt.get_backend(args.backend, cpu_replicas=args.cpu_replicas)
    for program in PROGRAMS:
        if backend.is_chief:
            print(f"{MARKER}{program}", flush=True)
        argv = ["--backend", args.backend, "--history-json", str(Path(args.out_dir) / f"{Path(program).stem}.json")]
        if args.cpu_replicas:
            argv += ["--cpu-replicas", str(args.cpu_replicas)]
        if program in EXTRA:
            argv += EXTRA[program](Path(args.out_dir), backend.num_replicas)
        sys.argv = [str(EXAMPLES / program)] + argv
        try:
            runpy.run_path(str(EXAMPLES / program), run_name="__main__")
        except SystemExit as end:
            if end.code not in (None, 0):
                raise


if __name__ == "__main__":
    main()
