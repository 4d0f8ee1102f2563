"""The README's usage snippet runs as written (single device and Mirrored on 2 logical CPUs)."""

import re

import pytest

from launchers import ROOT, run


@pytest.fixture(scope="module")
def snippet(tmp_path_factory):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    path = tmp_path_factory.mktemp("readme") / "train.py"
    # argparse-free snippet: the launcher's --backend flag is consumed here, the rest is the README's code
    path.write_text("import sys\nsys.argv = sys.argv[:1]\n" + code +
                    "\nassert history['loss'][-1] < 0.05, history\nprint('README OK', backend.name, backend.num_replicas)\n")
    return path


@pytest.mark.parametrize("env,expected", [({}, "single 1"), ({"DISTTRAIN_CPU_REPLICAS": "2"}, "mirrored 2")])
def test_readme_snippet_runs(snippet, env, expected):
    proc = run("single", snippet, extra_env=env, timeout=120)
    assert f"README OK {expected}" in proc.stdout
