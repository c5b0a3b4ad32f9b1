"""Training dynamics over the checkpoints of a tiny :smoke run: one row per checkpoint, the same accuracies as the run's
own evaluations, the synopsis' head scores, figures and summary, and samplers compiled once for all checkpoints."""

import logging

import jax
import numpy as np
import pytest
from PIL import Image

from relcirc_jax.analysis import capture, context, dynamics, groups, synopsis
from relcirc_jax.config import base_config
from relcirc_jax.errors import UserError
from relcirc_jax.evaluation import METRICS
from relcirc_jax.train import evaluate

STEPS = [2, 4]  # the shared smoke run (conftest.smoke_run): checkpoints every 2 of its 4 steps, its own eval at 4


def smoke_config():
    return base_config("rte", "nano", "smoke")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def report(smoke_run, tmp_path_factory):
    """(config, workdir, report directory, arrays, jax compile log lines of the dynamics run)."""
    workdir, config = smoke_run, smoke_config()
    records = _Records()
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(records)
    try:
        with jax.log_compiles(True):
            directory = dynamics.run(config, workdir, tmp_path_factory.mktemp("analysis"))
    finally:
        jax_logger.removeHandler(records)
    with np.load(directory / "dynamics.npz") as data:
        arrays = dict(data)
    return config, workdir, directory, arrays, records.messages


def test_one_row_per_checkpoint_with_the_runs_own_accuracies(report):
    config, _, _, arrays, _ = report
    depth, heads, roles = 2, 2, len(groups.TEXT_ROLES)
    assert list(arrays["steps"]) == STEPS and list(arrays["metrics"]) == list(METRICS)
    assert arrays["accuracy"].shape == (2, len(METRICS))
    assert np.all((arrays["accuracy"] >= 0) & (arrays["accuracy"] <= 1))
    assert arrays["relation_score"].shape == arrays["object_score"].shape == (2, depth, heads)
    assert arrays["role_mass"].shape == (2, depth, heads, roles) and list(arrays["roles"]) == list(groups.TEXT_ROLES)
    assert arrays["seconds"].shape == (2,) and np.all(arrays["seconds"] > 0)
    # eval.images_per_prompt = 1 = images_per_prompt: the same sampler, noises and scoring as the run's evaluation
    assert list(arrays["logged_steps"]) == [4]
    np.testing.assert_allclose(arrays["accuracy"][-1:], arrays["logged_accuracy"], rtol=1e-6)
    # where an image had bound objects, their tokens' attention over caption roles is a distribution
    bound = arrays["bound_fraction"] > 0
    np.testing.assert_allclose(arrays["role_mass"][bound].sum(-1), 1.0, rtol=1e-4)


def test_head_scores_equal_the_synopsis_of_the_last_checkpoint(report):
    config, workdir, _, arrays, _ = report
    model = context.from_workdir(config, workdir, STEPS[-1])
    captions = evaluate.eval_prompt_list(config)
    images = capture.sampler(model, len(captions))(model.params, model.tables, captions)
    token_groups = groups.image_token_groups(images, captions, model.model_cfg.patch_size, config.data.radius)
    expected = synopsis.synopsis(model, captions, token_groups)
    np.testing.assert_allclose(arrays["relation_score"][-1], expected["relation_score"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(arrays["object_score"][-1], expected["object_score"], rtol=1e-5, atol=1e-7)
    object_view = expected["cross"][:, :, :, :2].mean((0, 3))
    np.testing.assert_allclose(arrays["role_mass"][-1], object_view, rtol=1e-5, atol=1e-7)


def test_samplers_are_compiled_once_for_all_checkpoints(report):
    *_, messages = report
    compiled = [m for m in messages if m.startswith("Compiling") and "generate" in m.split(" with ")[0]]
    assert len(compiled) == 2, compiled  # the plain and the capture sampler, not 2 per checkpoint


def test_figures_and_summary(report):
    _, _, directory, _, _ = report
    for name in ("accuracy_curves", "relation_heads_over_training", "object_heads_over_training"):
        assert np.asarray(Image.open(directory / f"{name}.png").convert("L")).std() > 0, name
    summary = (directory / "summary.md").read_text()
    assert summary.startswith("# Training dynamics")
    for step in STEPS:
        assert f"\n| {step} | " in summary


def test_select_steps():
    assert dynamics.select_steps([2, 4, 6], None) == [2, 4, 6]
    assert dynamics.select_steps([2, 4, 6], 5) == [2, 4, 6]
    assert dynamics.select_steps(list(range(0, 110, 10)), 3) == [0, 50, 100]
    assert dynamics.select_steps([2, 4, 6], 1) == [6]
    with pytest.raises(ValueError):
        dynamics.select_steps([2], 0)


def test_no_checkpoint_says_train_first(tmp_path):
    with pytest.raises(UserError, match="Train first"):
        dynamics.run(smoke_config(), tmp_path, tmp_path / "analysis")
    assert list(tmp_path.iterdir()) == []
