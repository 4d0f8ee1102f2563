"""TensorFlow's pooling CPU allocator: ``import disttrain`` selects it unless the user chose, and it is the
allocator a process actually gets (TensorFlow keeps statistics only for the BFC allocator)."""

import subprocess
import sys

from launchers import base_env

from disttrain import allocator

PROBE = ("import disttrain, tensorflow as tf, os\n"
         "from disttrain import allocator\n"
         "x = tf.ones([256, 1024]) * 2.0\n"  # 1 MiB, the first CPU tensors of the process
         "print(os.environ.get('TF_CPU_ALLOCATOR_USE_BFC'), allocator.peak_bytes())\n")


def test_install_sets_the_switch_only_when_unset():
    env = {}
    assert allocator.install(env) and env == {"TF_CPU_ALLOCATOR_USE_BFC": "1"}
    for chosen in ("0", "false", "1"):
        env = {"TF_CPU_ALLOCATOR_USE_BFC": chosen}
        assert not allocator.install(env) and env == {"TF_CPU_ALLOCATOR_USE_BFC": chosen}


def run_probe(**extra):
    env = base_env()
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    env.update(extra)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_import_disttrain_gives_the_bfc_allocator_and_the_user_can_opt_out():
    switch, peak = run_probe()
    assert switch == "1" and int(peak) >= 2 * (1 << 20)  # the pool held both 1 MiB tensors at once
    assert run_probe(TF_CPU_ALLOCATOR_USE_BFC="0") == ["0", "None"]  # TensorFlow's malloc: no statistics
