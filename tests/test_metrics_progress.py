"""MetricWriter (JSONL + TensorBoard readback), ProgressLogger line format, EMA update and the SIGTERM flag."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from relcirc_jax.train.ema import ema_update, warmup_decay
from relcirc_jax.train.metrics import MetricWriter
from relcirc_jax.train.preemption import TimeBudget, install_sigterm_handler
from relcirc_jax.train.progress import ProgressLogger, format_duration


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.scalars(10, {"loss": 0.5, "grad_norm": np.float32(0.25)})
    writer.scalars(20, {"loss": jnp.float32(0.125)})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 10, "loss": 0.5, "grad_norm": 0.25}, {"step": 20, "loss": 0.125}]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [(10, 0.5), (20, 0.125)]
    assert [(event.step, event.value) for event in events.Scalars("grad_norm")] == [(10, 0.25)]


def test_image_is_a_png_and_a_tensorboard_image(tmp_path):
    writer = MetricWriter(tmp_path)
    image = np.zeros((8, 6, 3), np.uint8)
    image[2, 3] = (255, 0, 0)
    writer.image(30, "samples/grid", image)
    writer.text(30, "prompt", "red circle above blue square")
    writer.close()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "samples" / "samples_grid_00000030.png")), image)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    stored = events.Images("samples/grid")[0]
    assert (stored.step, stored.width, stored.height) == (30, 6, 8)
    with pytest.raises(ValueError, match="uint8"):
        MetricWriter(tmp_path).image(1, "bad", image.astype(np.float32))


def test_non_primary_process_writes_nothing(tmp_path):
    writer = MetricWriter(tmp_path / "run", is_primary=False)
    writer.scalars(1, {"loss": 1.0})
    writer.image(1, "x", np.zeros((2, 2, 3), np.uint8))
    writer.text(1, "t", "hello")
    writer.close()
    assert not (tmp_path / "run").exists()


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_line_format_throughput_and_eta():
    clock = FakeClock()
    progress = ProgressLogger(total_steps=4000, global_batch=64, log_every=20, clock=clock)
    assert progress.update(100, jnp.float32(0.2), 0.5) == "step 100/4000 | loss 0.2000 | grad 0.5"
    clock.now += 1.0
    assert progress.update(110, 0.1, 0.1) is None  # not a log step
    clock.now += 5.0
    line = progress.update(120, jnp.float32(0.0831), jnp.float32(0.123456))
    # 20 steps in 6 s: 0.30 s/step, 64 / 0.3 = 213.3 img/s, 3880 steps left * 0.3 s = 1164 s
    assert line == "step 120/4000 | loss 0.0831 | grad 0.123 | 213.3 img/s | 0.30 s/step | ETA 19m24s"


def test_progress_logs_the_final_step_and_durations_format():
    clock = FakeClock()
    progress = ProgressLogger(total_steps=25, global_batch=8, log_every=10, clock=clock)
    progress.update(1, 1.0, 1.0)
    clock.now += 24.0
    assert progress.update(25, 0.5, 0.5).endswith("| 8.0 img/s | 1.00 s/step | ETA 0s")
    assert [format_duration(s) for s in (45, 1164, 3723)] == ["45s", "19m24s", "1h02m03s"]


def test_a_time_budget_that_ends_first_caps_the_eta():
    clock = FakeClock()
    budget = TimeBudget(10, clock=clock)  # 600 s from now
    progress = ProgressLogger(
        total_steps=1000, global_batch=8, log_every=10, clock=clock, seconds_left=budget.seconds_left
    )
    progress.update(10, 1.0, 1.0)
    clock.now += 20.0
    # 2 s/step: 980 steps would take 32m40s, but the budget ends in 580 s
    assert progress.update(20, 1.0, 1.0).endswith("| 2.00 s/step | ETA 9m40s (time budget)")
    assert TimeBudget(None, clock=clock).seconds_left() is None
    clock.now += 1000.0
    assert budget.seconds_left() == 0.0 and budget.spent(21)


def test_ema_update_matches_torch_swa_ema():
    params = {"w": jnp.linspace(-1, 1, 6).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    ema = jax.tree.map(jnp.zeros_like, params)
    new = jax.jit(ema_update)(ema, params, 0.9)
    assert new["b"].dtype == jnp.bfloat16
    reference = torch.zeros(2, 3, dtype=torch.float64)
    update = torch.optim.swa_utils.get_ema_avg_fn(0.9)
    expected = update(reference, torch.tensor(np.asarray(params["w"], np.float64)), None)
    np.testing.assert_allclose(np.asarray(new["w"]), expected.numpy(), rtol=1e-6)
    assert float(warmup_decay(0, 0.9999)) == pytest.approx(0.1)
    assert float(warmup_decay(10**7, 0.9999)) == pytest.approx(0.9999)


def test_sigterm_sets_the_flag():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        flag = install_sigterm_handler()
        assert not flag.requested and not flag.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.should_stop(2)
    finally:
        signal.signal(signal.SIGTERM, previous)
