import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def equivalence_reference(tmp_path_factory):
    """tests/workers/equivalence.py on one device: the weights every other launch must match."""
    from equivalence_check import SCRIPT
    from launchers import run

    out = tmp_path_factory.mktemp("single")
    run("single", SCRIPT, ["--out", str(out)], timeout=180)
    return out
