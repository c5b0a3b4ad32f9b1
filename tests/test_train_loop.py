"""The training loop on 8 fake CPU devices with the tiny :smoke model: outputs, mesh invariance, bitwise resume (also
after SIGKILL, also mid async save), resume onto another mesh, the time budget, and the non-finite-loss stop that keeps
the last good checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from run_records import assert_bitwise_equal, metric_rows

from relcirc_jax.config import base_config
from relcirc_jax.data import dataset
from relcirc_jax.errors import UserError
from relcirc_jax.train import loop, sampling
from relcirc_jax.train import state as train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
NO_SAMPLING = {"eval.every_steps": 1000, "sample.every_steps": 1000}  # keeps runs that only compare states fast


def smoke_config(**overrides):
    config = base_config("rte", "nano", "smoke")
    config.train.num_steps = STEPS
    config.eval.every_steps = config.sample.every_steps = STEPS
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


def losses(workdir):
    return {row["step"]: row["loss"] for row in metric_rows(workdir) if "loss" in row}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run on all 8 devices (data=8), with a sample grid and an evaluation at the end."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    state = loop.train(smoke_config(), workdir)
    return workdir, jax.device_get(state)


def test_run_writes_config_metrics_tensorboard_checkpoints_samples_and_eval(reference):
    workdir, state = reference
    rows = metric_rows(workdir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and {"grad_norm", "lr"} <= set(r) for r in rows if "loss" in r)
    eval_rows = [r for r in rows if "eval/overall" in r]
    assert [r["step"] for r in eval_rows] == [STEPS]
    assert {"eval/color", "eval/shape", "eval/unique_binding", "eval/spatial_relationship"} <= set(eval_rows[0])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tb")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    assert os.path.exists(os.path.join(workdir, "samples", f"samples_{STEPS:08d}.png"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == STEPS
    assert int(state.step) == STEPS


FSDP_MESH = {"data": 4, "fsdp": 2, "model": 1}


@pytest.mark.parametrize("mesh,num_devices", [({"data": -1, "fsdp": 1, "model": 1}, 1), (FSDP_MESH, 8)])
def test_losses_do_not_depend_on_the_mesh(reference, tmp_path, mesh, num_devices):
    config = smoke_config(**NO_SAMPLING, **{"train.num_steps": 3})
    config.parallel.mesh.update(mesh)
    state = loop.train(config, str(tmp_path), devices=jax.devices()[:num_devices])
    if mesh["fsdp"] == 2:  # params and Adam moments really are split over fsdp, as the logical rules say
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves((state.params, state.opt_state))]
        assert sum("fsdp" in spec for spec in specs) >= 10
    expected = losses(reference[0])
    for step, loss in losses(str(tmp_path)).items():
        assert abs(loss - expected[step]) <= 1e-5, (step, loss, expected[step])


def logged_steps(workdir):
    return [row["step"] for row in metric_rows(workdir) if "loss" in row]


def test_stop_and_resume_is_bitwise_identical(reference, tmp_path, caplog):
    loop.train(smoke_config(**NO_SAMPLING, **{"train.num_steps": 2}), str(tmp_path))
    with caplog.at_level("INFO", logger="absl"):  # earlier absl flag parsing may have raised its level
        resumed = loop.train(smoke_config(**NO_SAMPLING), str(tmp_path))
    assert "Resumed from the checkpoint of step 2." in caplog.text
    assert logged_steps(str(tmp_path)) == list(range(1, STEPS + 1))  # the resumed run trained steps 3.. only
    assert_bitwise_equal(resumed, reference[1])
    assert losses(str(tmp_path)) == losses(reference[0])


def start_run_and_wait(workdir, until, *overrides):
    """A CLI training subprocess of the reference config (plus `overrides`), returned once `until(names in
    workdir/checkpoints)` holds (polled every millisecond), or when it ended or 120 s passed."""
    command = [
        sys.executable,
        "-m",
        "relcirc_jax.main",
        f"--config={REPO}/configs/rte_dit_nano.py:smoke",
        f"--workdir={workdir}",
        f"--config.train.num_steps={STEPS}",
        "--config.eval.every_steps=1000",
        "--config.sample.every_steps=1000",
        *overrides,
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = os.path.join(workdir, "checkpoints")
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if until(os.listdir(checkpoints) if os.path.isdir(checkpoints) else []):
            break
        time.sleep(0.001)
    return process


def start_run_and_wait_for_first_checkpoint(workdir):
    """The reference run as a subprocess, returned once its step-2 checkpoint is committed."""
    return start_run_and_wait(workdir, lambda names: "2" in names)


def test_sigkill_mid_run_then_restart_is_bitwise_identical(reference, tmp_path, caplog):
    process = start_run_and_wait_for_first_checkpoint(str(tmp_path))
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-3000:]}"
    logged_before = len(logged_steps(str(tmp_path)))
    with caplog.at_level("INFO", logger="absl"):  # earlier absl flag parsing may have raised its level
        restarted = loop.train(smoke_config(**NO_SAMPLING), str(tmp_path))
    resumed_from = int(re.search(r"Resumed from the checkpoint of step (\d+)\.", caplog.text).group(1))
    assert resumed_from >= 2 and logged_steps(str(tmp_path))[logged_before:] == list(range(resumed_from + 1, STEPS + 1))
    assert_bitwise_equal(restarted, reference[1])


def test_sigkill_during_an_async_save_then_restart_is_bitwise_identical(reference, tmp_path):
    # Orbax writes a step into "<step>.orbax-checkpoint-tmp-*" and renames it when complete: kill while one exists.
    process = start_run_and_wait(
        str(tmp_path),
        lambda names: any("tmp" in n for n in names),
        "--config.checkpoint.async_save=true",
    )
    in_flight = [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-3000:]}"
    assert in_flight, "no save was in flight when the run was killed"
    restarted = loop.train(smoke_config(**NO_SAMPLING), str(tmp_path))
    assert_bitwise_equal(restarted, reference[1])


def test_a_state_saved_on_a_data_mesh_resumes_on_an_fsdp_mesh(reference, tmp_path):
    loop.train(smoke_config(**NO_SAMPLING, **{"train.num_steps": 2}), str(tmp_path))  # data=8
    config = smoke_config(**NO_SAMPLING)
    config.parallel.mesh.update(FSDP_MESH)  # the mesh test's: its compiled train step is in the compilation cache
    resumed = loop.train(config, str(tmp_path))
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves((resumed.params, resumed.opt_state))]
    assert sum("fsdp" in spec for spec in specs) >= 10
    assert logged_steps(str(tmp_path)) == list(range(1, STEPS + 1))
    expected = losses(reference[0])
    for step, loss in losses(str(tmp_path)).items():
        assert abs(loss - expected[step]) <= 1e-5, (step, loss, expected[step])
    for got, want in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(reference[1].params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_a_run_goes_on_at_another_image_size_on_the_same_position_grid(tmp_path):
    """Progressive resolution: steps at 32 px on the 64 px position grid, then the same run at 64 px resumes from its
    checkpoint (its step count goes on) and samples and evaluates at 64 px; a 32 px run on its own grid
    is refused at 64 px, naming the field."""
    low = {"data.image_size": 32, "data.radius": 4, "train.num_steps": 2}
    grown = str(tmp_path / "grown")
    loop.train(smoke_config(**NO_SAMPLING, **low, **{"model.pos_embed_image_size": 64}), grown)
    state = loop.train(smoke_config(**{"train.num_steps": 4, "eval.every_steps": 4, "sample.every_steps": 4}), grown)
    assert int(state.step) == 4 and logged_steps(grown) == [1, 2, 3, 4]
    with Image.open(os.path.join(grown, "samples", "samples_00000004.png")) as grid:
        assert grid.size == sampling.image_grid(np.zeros((8, 64, 64, 3), np.uint8)).shape[1::-1]
    assert [r["step"] for r in metric_rows(grown) if "eval/overall" in r] == [4]
    own_grid = str(tmp_path / "own_grid")
    loop.train(smoke_config(**NO_SAMPLING, **low), own_grid)
    with pytest.raises(UserError, match="data.image_size: 64 vs 32"):
        loop.train(smoke_config(**NO_SAMPLING, **{"train.num_steps": 4}), own_grid)


def test_sigterm_saves_exits_zero_and_resumes_bitwise(reference, tmp_path):
    process = start_run_and_wait_for_first_checkpoint(str(tmp_path))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    stopped_at = int(re.search(r"Preempted: saved the checkpoint of step (\d+)", stderr).group(1))
    assert str(stopped_at) in os.listdir(tmp_path / "checkpoints")
    resumed = loop.train(smoke_config(**NO_SAMPLING), str(tmp_path))
    assert_bitwise_equal(resumed, reference[1])


@pytest.mark.parametrize("bad_step", [3, 4], ids=["between_saves", "on_a_save_step"])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, bad_step):
    clean_batch = dataset.train_batch

    def poisoned_batch(seed, step, **kwargs):
        batch = clean_batch(seed, step, **kwargs)
        if step == bad_step - 1:  # the batch of update number `bad_step`
            batch["image"][0, 0, 0, 0] = np.nan
        return batch

    monkeypatch.setattr(loop.dataset, "train_batch", poisoned_batch)
    config = smoke_config(**NO_SAMPLING)  # saves every 2 steps
    with pytest.raises(
        FloatingPointError,
        match=rf"Non-finite training loss nan .* at step {bad_step}\. .*last good "
        r"checkpoint \(step 2\)",
    ):
        loop.train(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    setup = train_state.build_run_setup(config, str(tmp_path))
    step, state = train_state.restore_or_fail(setup, str(tmp_path))
    setup.checkpointer.close()
    assert step == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_spent_time_budget_saves_samples_and_evaluates_the_last_step_then_stops(tmp_path, caplog):
    config = smoke_config(**{"train.time_budget_minutes": 1e-9, "eval.every_steps": 1000, "sample.every_steps": 1000})
    with caplog.at_level("WARNING", logger="absl"):
        loop.train(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["1"]  # log.every_steps=1: the budget is checked after each step
    rows = metric_rows(str(tmp_path))
    assert [row["step"] for row in rows if "loss" in row] == [1]
    assert [row["step"] for row in rows if "eval/overall" in row] == [1]  # the curve ends with the model that was saved
    assert os.listdir(tmp_path / "samples") == ["samples_00000001.png"]
    assert "time_budget_minutes=1e-09 spent: saved and evaluated the checkpoint of step 1" in caplog.text


def test_the_last_step_is_saved_before_its_evaluation_runs(tmp_path, monkeypatch):
    def failing_evaluation(self, state, step, writer, *, final=False):
        if final:
            raise RuntimeError("the evaluation failed (an out-of-memory sampler, say)")

    monkeypatch.setattr(loop._PeriodicSampling, "__call__", failing_evaluation)
    config = smoke_config(**{"train.time_budget_minutes": 1e-9, **NO_SAMPLING})
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        loop.train(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_evaluated_steps_are_saved_and_keep_period_keeps_them_past_keep(tmp_path, monkeypatch):
    evaluated = []

    def record_evaluations(self, state, step, writer, *, final=False):  # the saving is under test, not the sampling
        if step % self.setup.config.eval.every_steps == 0:
            evaluated.append(step)

    monkeypatch.setattr(loop._PeriodicSampling, "__call__", record_evaluations)
    periods = {"eval.every_steps": 3, "checkpoint.every_steps": 4, "checkpoint.keep": 1, "checkpoint.keep_period": 3}
    loop.train(smoke_config(**{"sample.every_steps": 1000, **periods}), str(tmp_path))
    assert evaluated == [3, 6]
    # saved: 3 (evaluated), 4 (interval), 6 (last); keep=1 deletes 4, keep_period=3 keeps 3
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["3", "6"]


def test_a_checkpoint_of_another_model_stops_the_run_and_keeps_its_config(tmp_path):
    loop.train(smoke_config(**{"train.num_steps": 2, **NO_SAMPLING}), str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    other = smoke_config(**{"train.num_steps": 4, **NO_SAMPLING})
    other.text.encoder = "rte_nopos"  # the same parameter shapes: it would load silently
    with pytest.raises(UserError, match=r"step 2 .* another model .*text\.encoder: 'rte_nopos' vs 'rte'"):
        loop.train(other, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved
    setup = train_state.build_run_setup(other, str(tmp_path))
    try:  # evaluate, sample and export read checkpoints through restore_or_fail: the same check
        with pytest.raises(UserError, match="another model"):
            train_state.restore_or_fail(setup, str(tmp_path))
    finally:
        setup.checkpointer.close()
    wider = smoke_config(**{"train.num_steps": 4, "model.hidden_size": 64, **NO_SAMPLING})  # other shapes
    with pytest.raises(UserError, match=r"step 2 .* another model .*hidden_size: 64 vs"):
        loop.train(wider, str(tmp_path))  # named from the checkpoint's meta, before Orbax fails on the shapes
    assert os.listdir(tmp_path / "checkpoints") == ["2"] and (tmp_path / "config.json").read_text() == saved
    muon = smoke_config(**{"train.num_steps": 4, "train.optimizer": "muon", **NO_SAMPLING})  # other optimizer state
    with pytest.raises(UserError, match=r"step 2 .* another optimizer.*train\.optimizer: 'muon' vs 'adamw'"):
        loop.train(muon, str(tmp_path))
