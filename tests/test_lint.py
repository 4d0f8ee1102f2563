"""Static checks: no undefined names, unused imports or syntax errors (ruff's pyflakes rules)."""

import subprocess

from launchers import BIN, ROOT


def test_pyflakes_rules_pass():
    proc = subprocess.run([str(BIN / "ruff"), "check", "--select", "F,E9", "--no-cache", "disttrain", "tests",
                           "examples", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
