"""Multi-process training on localhost: 2 processes x 2 CPU devices joined by jax.distributed.initialize (gloo CPU
collectives) train and checkpoint, then 1 process x 4 devices resumes to the end; the loss curve must equal an
uninterrupted single-process 4-device run. Two processes agree on when a time budget is spent. Also the CLI's checks
of the distributed flags and the host<->global batch helpers (in this process, on the 8 fake devices of conftest)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from run_records import metric_series
from xla_env import subprocess_env

from relcirc_jax import main as cli
from relcirc_jax.parallel import make_mesh, shared_to_global, to_host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEPS, TOTAL_STEPS = 3, 6
TIMEOUT_SECONDS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir, cache_dir, num_steps, local_devices, *distributed_flags):
    """A CLI training process of the micro :smoke config, one block deep (what is compared does not depend on depth;
    each process compiles a third less), on `local_devices` fake CPU devices, with a checkpoint, a sample grid and an
    evaluation every 3 steps."""
    env = subprocess_env(local_devices)
    command = [
        sys.executable,
        "-m",
        "relcirc_jax.main",
        f"--config={REPO}/configs/rte_dit_micro.py:smoke",
        f"--workdir={workdir}",
        f"--config.train.num_steps={num_steps}",
        "--config.model.depth=1",
        "--config.checkpoint.every_steps=3",
        "--config.sample.every_steps=3",
        "--config.eval.every_steps=3",
        f"--config.compilation_cache_dir={cache_dir}",
        *distributed_flags,
    ]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process) -> str:
    _, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def loss_rows(workdir) -> list[tuple[int, float]]:
    return metric_series(workdir, "loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of the two-process-then-resumed run and of the reference, the stderr of processes 0 and 1 of the
    two-process phase, what that phase left behind, and the compilation cache directory."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    resumed, reference = str(tmp_path_factory.mktemp("resumed")), str(tmp_path_factory.mktemp("reference"))
    coordinator = f"--coordinator_address=localhost:{free_port()}"
    workers = [
        start(resumed, cache, FIRST_STEPS, 2, coordinator, "--num_processes=2", f"--process_id={i}") for i in range(2)
    ]
    single = start(reference, cache, TOTAL_STEPS, 4)  # meanwhile; it also puts the 4-device step into the cache
    stderrs = [finish(p) for p in workers]
    finish(single)
    first_phase = {
        "rows": loss_rows(resumed),
        "checkpoints": sorted(os.listdir(os.path.join(resumed, "checkpoints"))),
        "samples": sorted(os.listdir(os.path.join(resumed, "samples"))),
    }
    finish(start(resumed, cache, TOTAL_STEPS, 4))
    return dict(resumed=resumed, reference=reference, stderrs=stderrs, first_phase=first_phase, cache=cache)


def test_two_processes_form_one_four_device_mesh_and_only_process_0_writes(runs):
    (stderr0, stderr1), first_phase = runs["stderrs"], runs["first_phase"]
    assert "on mesh {'data': 4, 'fsdp': 1, 'model': 1}" in stderr0
    assert "step 3/3" in stderr0 and "step 3/3" not in stderr1  # process 1 logs warnings only
    assert [step for step, _ in first_phase["rows"]] == [1, 2, 3]  # one metrics row per step: process 0's
    assert first_phase["checkpoints"] == ["3"]
    assert first_phase["samples"] == ["samples_00000003.png"]


def test_sampling_and_evaluation_across_processes_equal_the_single_process_ones(runs):
    for key in ("eval/color", "eval/shape", "eval/overall"):
        got, expected = metric_series(runs["resumed"], key), metric_series(runs["reference"], key)
        assert [step for step, _ in got] == [3, 6] and got == expected, key


def test_resume_on_one_process_matches_an_uninterrupted_run(runs):
    expected, got = dict(loss_rows(runs["reference"])), dict(loss_rows(runs["resumed"]))
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL_STEPS + 1))
    for step, loss in got.items():
        assert abs(loss - expected[step]) <= 1e-5, (step, loss, expected[step])


def test_config_compilation_cache_dir_is_used(runs):
    assert os.listdir(runs["cache"])


BUDGET_WORKER = """
import sys
import jax
from relcirc_jax.train.preemption import TimeBudget

process_id, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
calls = []

def clock():  # process 0's clock gains 30 s per reading; process 1's stands still
    calls.append(None)
    return 30.0 * (len(calls) - 1) if process_id == 0 else 0.0

budget = TimeBudget(1.0, sync_every=2, clock=clock)
print([int(budget.spent(step)) for step in range(1, 9)])
"""


def test_two_processes_stop_at_the_same_step_when_process_0s_budget_is_spent():
    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", BUDGET_WORKER, str(i), str(port)],
            cwd=REPO,
            env=subprocess_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=TIMEOUT_SECONDS)
        assert worker.returncode == 0, stderr[-4000:]
        outputs.append(stdout.strip().splitlines()[-1])
    # The clock is read only at multiples of sync_every: process 0's reads 60 s, its 1-minute deadline, at step 4, and
    # process 1, whose own clock never gets there, stops with it.
    assert outputs == ["[0, 0, 0, 1, 0, 1, 0, 1]"] * 2


def test_partial_distributed_flags_fail_with_the_fix(tmp_path):
    cli.FLAGS.unparse_flags()
    cli.FLAGS(
        [
            "main",
            f"--config={REPO}/configs/rte_dit_nano.py:smoke",
            f"--workdir={tmp_path}",
            "--coordinator_address=localhost:1234",
        ]
    )
    try:
        with pytest.raises(cli.UserError, match="but not --num_processes --process_id. Fix: pass all three"):
            cli.join_distributed_job()
    finally:
        cli.FLAGS.unparse_flags()


def test_distributed_without_a_cluster_fails_with_the_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORDINATOR"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relcirc_jax.main",
            f"--config={REPO}/configs/rte_dit_nano.py:smoke",
            f"--workdir={tmp_path}",
            "--distributed",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert result.returncode == 2 and "Error: --distributed found no cluster to join" in result.stderr
    assert "--distributed found no cluster to join" in result.stderr and "pass --coordinator_address" in result.stderr


def test_shared_batch_goes_to_the_devices_and_back_whole():
    mesh = make_mesh({"data": 4, "fsdp": 2, "model": 1})
    batch = {"ids": np.arange(16 * 3, dtype=np.int32).reshape(16, 3), "noise_id": np.arange(16, dtype=np.int32)}
    placed = shared_to_global(batch, mesh)
    assert placed["ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert {shard.data.shape for shard in placed["ids"].addressable_shards} == {(2, 3)}
    for key, value in batch.items():
        np.testing.assert_array_equal(to_host(placed[key]), value)
