"""launch/*.sbatch in a fake SLURM job: the exact srun/horovodrun command and each task's TF_CONFIG.

tests/fake_slurm/ holds stand-ins for srun and horovodrun that record their arguments (srun also runs
the command once per task with the variables real srun sets, from SLURM's compressed node list).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import ROOT, base_env
from disttrain.launcher.hosts import expand_counts, expand_hostlist

FAKE = ROOT / "tests" / "fake_slurm"
DUMP = """import json, os, sys
with open(os.path.join(os.environ["OUT"], "task" + os.environ["SLURM_PROCID"] + ".json"), "w") as f:
    json.dump({"TF_CONFIG": json.loads(os.environ["TF_CONFIG"]), "argv": sys.argv[1:]}, f)
"""


def run_sbatch(tmp_path, script, *, nodes, per_node, step_nodelist, step_tasks, extra_env=None, train_text=DUMP,
               returncode=0):
    """Runs the sbatch script in the fake SLURM; returns (the training script, the recorded calls) or, with
    another ``returncode`` expected, the finished process."""
    train = tmp_path / "train.py"
    train.write_text(train_text)
    log = tmp_path / "log.jsonl"
    env = dict(base_env(), PATH=f"{FAKE}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               FAKE_LOG=str(log), FAKE_NODES=",".join(nodes), FAKE_TASKS_PER_NODE=str(per_node),
               FAKE_STEP_NODELIST=step_nodelist, FAKE_STEP_TASKS_PER_NODE=step_tasks, OUT=str(tmp_path),
               SLURM_JOB_NODELIST=step_nodelist, SLURM_TASKS_PER_NODE=step_tasks,
               SLURM_NTASKS=str(len(nodes) * per_node), SLURM_PROCID="0", DISTTRAIN_PYTHON=sys.executable,
               **(extra_env or {}))
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), str(train), "--epochs", "3"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == returncode, proc.stderr
    if returncode:
        return proc
    return train, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("nodes,per_node,step_nodelist,step_tasks", [
    (["node01", "node02"], 1, "node[01-02]", "1(x2)"),
    (["gpu-a7", "gpu-b12"], 2, "gpu-a7,gpu-b12", "2(x2)"),
])
def test_multiworker_sbatch_forms_tf_config_from_slurm(tmp_path, nodes, per_node, step_nodelist, step_tasks):
    train, calls = run_sbatch(tmp_path, "slurm-multiworker.sbatch", nodes=nodes, per_node=per_node,
                              step_nodelist=step_nodelist, step_tasks=step_tasks, extra_env={"DISTTRAIN_PORT": "23456"})
    assert calls == [["srun", "--kill-on-bad-exit=1", "--distribution=block", "bash", "-c",
                      'TF_CONFIG=$("$1" -m disttrain.cli slurm tf-config --port "$0") && export TF_CONFIG && exec "$@"',
                      "23456", sys.executable, str(train), "--epochs", "3"]]
    workers = [f"{node}:{23456 + i}" for node in nodes for i in range(per_node)]
    for rank in range(len(workers)):
        task = json.loads((tmp_path / f"task{rank}.json").read_text())
        assert task == {"TF_CONFIG": {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}},
                        "argv": ["--epochs", "3"]}


def test_horovod_sbatch_runs_srun_with_pmix_or_horovodrun_on_the_job_hosts(tmp_path):
    layout = dict(nodes=["node01", "node02"], per_node=4, step_nodelist="node[01-02]", step_tasks="4(x2)")
    train, calls = run_sbatch(tmp_path, "slurm-horovod.sbatch", **layout, extra_env={"FAKE_SRUN_RUN": "0"})
    assert calls == [["srun", "--mpi=pmix", "--kill-on-bad-exit=1", sys.executable, str(train), "--epochs", "3"]]
    train, calls = run_sbatch(tmp_path, "slurm-horovod.sbatch", **layout,
                              extra_env={"DISTTRAIN_SLURM_LAUNCHER": "horovodrun"})
    assert calls[-1] == ["horovodrun", "-np", "8", "-H", "node01:4,node02:4", sys.executable, str(train),
                         "--epochs", "3"]


# Each task records the code TASK_CODES gives it (as a disttrain process records its own), then exits with
# it; task 1 then dies of SIGKILL, as srun --kill-on-bad-exit kills the others after the first exit.
RECORD = """import os, signal, time
from disttrain import exit_status
rank = int(os.environ["SLURM_PROCID"])
exit_status.start(rank=rank, size=int(os.environ["SLURM_STEP_NUM_TASKS"]))
code = int(os.environ["TASK_CODES"].split(",")[rank])
time.sleep(0.2 * rank)
exit_status.record(code=code, reason=f"task {rank} says {code}")
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
os._exit(code)
"""


@pytest.mark.parametrize("script,codes,expected,line", [
    ("slurm-multiworker.sbatch", "42,42", 42,
     "disttrain run: every rank (2 of 2) was preempted and saved (rank 0: task 0 says 42); exit 42 (srun exited 137)"),
    ("slurm-horovod.sbatch", "3,42", 3,
     "disttrain run: rank 0 failed first, with exit code 3 (task 0 says 3); exit 3 (srun exited 137)"),
])
def test_sbatch_scripts_exit_42_when_every_task_saved_else_the_first_failing_code(tmp_path, script, codes, expected,
                                                                                   line):
    """srun gives 137 (a task it killed); the scripts run it under `disttrain run`, whose status directory
    (DISTTRAIN_STATUS_ROOT/<job id>) is removed after the job."""
    root = tmp_path / "status"
    proc = run_sbatch(tmp_path, script, nodes=["node01", "node02"], per_node=1, step_nodelist="node[01-02]",
                      step_tasks="1(x2)", train_text=RECORD, returncode=expected,
                      extra_env={"TASK_CODES": codes, "DISTTRAIN_STATUS_ROOT": str(root), "SLURM_JOB_ID": "77"})
    assert proc.stderr.splitlines()[-1] == line, proc.stderr
    assert root.is_dir() and not (root / "77").exists()


def test_slurm_host_lists_expand_as_scontrol_show_hostnames_does():
    assert expand_hostlist("node[01-03,7],gpu-a[1-2]x,solo") == [
        "node01", "node02", "node03", "node7", "gpu-a1x", "gpu-a2x", "solo"]
    assert expand_hostlist("rack[1-2]-n[08-09]") == ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]
    assert expand_counts("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match=r"bad range '5-3' in SLURM host list 'n\[5-3\]'"):
        expand_hostlist("n[5-3]")


def test_a_task_placed_outside_the_block_layout_is_refused():
    from disttrain.launcher.slurm import tf_config

    env = {"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "1",
           "SLURMD_NODENAME": "n2", "SLURM_LOCALID": "0"}  # cyclic distribution put task 1 on n2
    with pytest.raises(ValueError, match="task 1 runs on n2 as local task 0, but the block layout puts it at "
                                         "n1:12346; launch with srun --distribution=block"):
        tf_config(env=env)


def test_multiworker_under_plain_srun_forms_tf_config_from_slurm():
    """`srun python train.py --backend multiworker` without PMI: the backend's TF_CONFIG comes from SLURM's
    variables (the workers themselves then start as with any TF_CONFIG, tests/test_equivalence.py)."""
    from disttrain.backends.rendezvous import tf_config_from_launcher

    env = {"SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[7-8]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURMD_NODENAME": "gpu8", "SLURM_LOCALID": "1", "DISTTRAIN_PORT": "20000"}
    assert json.loads(tf_config_from_launcher(env)) == {
        "cluster": {"worker": ["gpu7:20000", "gpu7:20001", "gpu8:20000", "gpu8:20001"]},
        "task": {"type": "worker", "index": 3}}
    assert tf_config_from_launcher({**env, "TF_CONFIG": "given"}) == "given"  # an explicit TF_CONFIG wins
    assert tf_config_from_launcher({}) is None
