"""Runs tests/workers/nonfinite.py, then tests/workers/checks.py, in ONE process (same argv, same
backend: ``dt.get_backend`` returns the one the first created), for tests/fault_launches.py."""

import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent

for worker in ("nonfinite.py", "checks.py"):
    runpy.run_path(str(HERE / worker), run_name="__main__")
