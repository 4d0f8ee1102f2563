"""A real full disk for the storage-fault tests (tests/test_checkpoint_damage.py, tests/workers/ckpt_damage.py)."""

import disttrain as dt


def fill(path) -> None:
    """Writes zeros to ``path`` until its filesystem is full (a real ENOSPC for the next write)."""
    f = open(path, "wb", buffering=0)
    try:
        while True:
            f.write(b"\0" * 4096)
    except OSError:
        pass
    finally:
        f.close()


class FillDiskAt(dt.Callback):
    """Fills the filesystem of ``path`` after global step ``step``, on the chief only."""

    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_step_logs(self, trainer, step, logs):
        if step == self.step and trainer.backend.is_chief:
            fill(self.path)
