"""Set-up on a bare Debian: scripts/setup.sh installs the build tools it finds missing, and only those.

The first step of the set-up (`scripts/setup.sh system`, the Debian packages) runs with a PATH from which
the C++ compiler, make and cmake are hidden, with Python's ensurepip hidden (as on Debian without
python3-venv), and with a stand-in apt-get that records what it is asked for and "installs" it by
putting the real tool back on that PATH. (A debootstrap chroot would need a Debian mirror per test run.)
"""

import os
import shutil
import subprocess
import sys

from launchers import ROOT

HIDDEN = ("c++", "g++", "make", "cmake")
KEPT = ("bash", "sh", "env", "id", "head", "awk", "xargs", "echo", "dirname", "cat", "cut", "ln", "rm", "mpirun", "mpicc",
        "python3")
FAKE_APT = """#!/usr/bin/env bash
echo "$*" >> "{log}"
if [ "$1" = install ]; then
  for pkg in "$@"; do
    case "$pkg" in
      g++) ln -sf /usr/bin/g++ "{bin}/g++"; ln -sf /usr/bin/c++ "{bin}/c++" ;;
      make|cmake) ln -sf "/usr/bin/$pkg" "{bin}/$pkg" ;;
      python3-venv) rm -f "{shadow}/ensurepip.py" ;;
    esac
  done
fi
"""


def test_setup_installs_the_missing_build_tools_once(tmp_path):
    bin_dir, shadow = tmp_path / "bin", tmp_path / "shadow"
    bin_dir.mkdir()
    shadow.mkdir()
    for tool in KEPT:
        found = shutil.which(tool) if tool != "python3" else sys.executable
        assert found, f"{tool} is needed for this test"
        os.symlink(found, bin_dir / tool)
    for tool in HIDDEN:
        assert shutil.which(tool, path=str(bin_dir)) is None
    (shadow / "ensurepip.py").write_text("raise ImportError('ensurepip hidden by the test (no python3-venv)')\n")
    log = tmp_path / "apt.log"
    apt = bin_dir / "apt-get"
    apt.write_text(FAKE_APT.format(log=log, bin=bin_dir, shadow=shadow))
    apt.chmod(0o755)
    env = {"PATH": str(bin_dir), "PYTHONPATH": str(shadow), "HOME": str(tmp_path), "PYTHON": "python3"}

    def setup():
        return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "system"], env=env, capture_output=True,
                              text=True, timeout=120)

    first = setup()
    assert first.returncode == 0, first.stderr
    assert "[setup] installing Debian packages: g++ make cmake python3-venv" in first.stderr
    assert log.read_text().splitlines() == ["update -qq", "install -y -qq --no-install-recommends g++ make cmake "
                                                          "python3-venv"]
    for tool in HIDDEN:
        assert shutil.which(tool, path=str(bin_dir)), f"{tool} was not installed"
    second = setup()  # idempotent: nothing is missing any more
    assert second.returncode == 0, second.stderr
    assert "installing" not in second.stderr and len(log.read_text().splitlines()) == 2
