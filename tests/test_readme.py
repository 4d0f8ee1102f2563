"""The README's snippets run as written (single device and Mirrored on 2 logical CPUs; the checkpoint
snippet resumes when the same program runs again)."""

import re

import pytest

from launchers import ROOT, TEST_ONLY_ENV, run, startup_notices


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.fixture(scope="module")
def snippet(tmp_path_factory):
    code = _snippets()[0]
    path = tmp_path_factory.mktemp("readme") / "train.py"
    # argparse-free snippet: the launcher's --backend flag is consumed here, the rest is the README's code
    path.write_text("import sys\nsys.argv = sys.argv[:1]\n" + code +
                    "\nassert history['loss'][-1] < 0.05, history\nprint('README OK', backend.name, backend.num_replicas)\n")
    return path


@pytest.mark.parametrize("env,expected", [({}, "single 1"), ({"DISTTRAIN_CPU_REPLICAS": "2"}, "mirrored 2")])
def test_readme_snippet_runs(snippet, env, expected):
    """In a user's environment (no TEST_ONLY_ENV): it prints none of TensorFlow's start-up notices."""
    proc = run("single", snippet, extra_env={**env, **dict.fromkeys(TEST_ONLY_ENV)}, timeout=120)
    assert f"README OK {expected}" in proc.stdout
    assert not startup_notices(proc.stderr), proc.stderr[-3000:]


def test_readme_checkpoint_snippet_resumes_when_run_again(tmp_path):
    usage, checkpoints = _snippets()[:2]
    assert "dt.Checkpointing(" in checkpoints
    path = tmp_path / "train.py"
    path.write_text("import os, sys\nsys.argv = sys.argv[:1]\nos.chdir(os.path.dirname(__file__))\n" + usage +
                    checkpoints + "\nprint('epochs', len(history['loss']), int(optimizer.iterations.numpy()))\n")
    first = run("single", path, timeout=120)
    assert "epochs 3 96" in first.stdout and "resuming" not in first.stderr
    second = run("single", path, timeout=120)
    assert "resuming from runs/ckpt/ckpt-1 at the start of epoch 4 (global step 96)" in second.stderr
    assert "epochs 3 96" in second.stdout  # nothing left to run: the saved history comes back
