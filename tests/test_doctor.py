"""``disttrain doctor``: on this CPU machine it runs the CPU parts (a real 2-replica Mirrored equivalence on
logical CPU devices), says there is no GPU and exits 0; it stops at the first failure with exit code 1 and a
message that names it (a real fault: Horovod that does not import)."""

import subprocess

from disttrain.doctor import Doctor, DoctorError, nccl_version
from launchers import BIN, base_env

CPU_CHECKS = ["tensorflow", "gpus", "cuda libraries", "horovod", "nccl", "mirrored = one device"]


def _doctor(env, tmp_path):
    return subprocess.run([str(BIN / "disttrain"), "doctor"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)


def test_doctor_on_a_cpu_machine_runs_the_cpu_parts_and_exits_0(tmp_path):
    proc = _doctor(base_env(), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"ok    {name}" for name in CPU_CHECKS], proc.stdout
    assert "gpus: none (CPU only)" in lines[1]
    assert "tensorflow yes, gloo yes" in lines[3] and "nccl no" in lines[3]
    mirrored = lines[5]
    assert "2 replicas (ReductionToOneDevice), largest relative difference" in mirrored
    assert float(mirrored.split("difference ")[1].split()[0]) <= 1e-5
    assert lines[-1].startswith("no GPU: TensorFlow sees none here, so the GPU checks (horovodrun -np <GPUs> with "
                                "NCCL, mixed_float16, throughput) were not run")


def test_doctor_stops_at_the_first_failure(tmp_path):
    shadow = tmp_path / "shadow" / "horovod"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('libhorovod.so: cannot open shared object file')\n")
    env = base_env()
    env["PYTHONPATH"] = f"{tmp_path / 'shadow'}:{env['PYTHONPATH']}"
    proc = _doctor(env, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line[:6] for line in lines[:3]] == ["ok    "] * 3, proc.stdout
    assert lines[3].startswith("FAIL  horovod: Horovod with TensorFlow does not import (libhorovod.so: cannot open "
                               "shared object file); install it with `disttrain install-horovod`"), proc.stdout
    assert lines[4] == "disttrain doctor: stopped at the first failure (horovod); see docs/gpu.md"
    assert len(lines) == 5  # nothing after the failure ran


def test_the_gpu_checks_run_in_order_after_the_cpu_parts(capsys):
    """With (simulated) GPUs the run goes on to the GPU checks, and a failing one ends it with code 1."""
    doctor = Doctor(simulate_gpus=2)
    ran = []
    for name in ("check_tensorflow", "check_gpus", "check_cuda_libraries", "check_horovod", "check_nccl",
                 "check_mirrored", "check_horovodrun", "check_throughput"):
        setattr(doctor, name, lambda name=name: ran.append(name) or "fine")

    def mixed():
        ran.append("check_mixed_precision")
        raise DoctorError("mixed_float16 training did not learn: loss per epoch [nan, nan]")

    doctor.check_mixed_precision = mixed
    assert doctor.run() == 1
    assert ran[-2:] == ["check_horovodrun", "check_mixed_precision"] and "check_throughput" not in ran
    out = capsys.readouterr().out
    assert "FAIL  mixed_float16: mixed_float16 training did not learn: loss per epoch [nan, nan]" in out


def test_nccl_version_of_a_library_that_is_not_nccl(tmp_path):
    import pytest

    with pytest.raises(DoctorError, match="does not load"):
        nccl_version(str(tmp_path / "libnccl.so.2"))
