"""launch/local.sh starts N processes whose backend is detected from the launcher (--backend auto)."""

import json
import subprocess

import pytest

from launchers import ROOT, WORKERS, base_env


@pytest.mark.parametrize("mode,backend", [("mpi", "horovod"), ("tf-config", "multiworker")])
def test_local_launcher(mode, backend, tmp_path):
    env = base_env()
    env.pop("DISTTRAIN_THREADS")
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), mode, "2", str(WORKERS / "collectives.py"),
                           "--backend", "auto", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["backend"], r["rank"], r["size"]) for r in results] == [(backend, 0, 2), (backend, 1, 2)]
    assert all(r["sum_int"] == 3 for r in results)


def test_local_launcher_rejects_bad_arguments():
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), "slurm", "2", "x.py"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown mode 'slurm'; use horovod, mpi or tf-config" in proc.stderr
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), "mpi", "two", "x.py"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "N must be a positive integer, got 'two'" in proc.stderr
