"""Config files load and validate in every variant; bad values and unknown override keys give clear messages."""

import glob
import importlib.util
import os

import pytest
from absl import flags
from ml_collections import config_flags

from relcirc_jax.config import CPU_STEP_SECONDS, ENCODERS, LOW_RESOLUTION_STEP_COST, SIZES, base_config
from relcirc_jax.config_checks import explain_config_flags, validate_config
from relcirc_jax.errors import UserError
from relcirc_jax.models import cpu_bf16_matmul
from relcirc_jax.train import state as train_state
from relcirc_jax.train.preemption import TimeBudget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*_dit_*.py")))


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MMDIT_SIZES = ("mini", "micro", "nano")


def _name_fields(path) -> tuple[str, str, str]:
    """(arch, encoder, size) that a config file's name promises: "[mmdit_]ENCODER_dit_SIZE.py"."""
    name = os.path.basename(path)[:-3]
    arch = "mmdit" if name.startswith("mmdit_") else "pixart"
    encoder, size = name.removeprefix("mmdit_").split("_dit_")
    return arch, encoder, size


def test_one_config_file_per_encoder_and_size():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    pixart = {f"{e}_dit_{s}" for e in ENCODERS for s in SIZES}
    assert names == pixart | {f"mmdit_rte_dit_{s}" for s in MMDIT_SIZES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "cpu", "cpu32", "long", "quick", "smoke"])
def test_config_files_load_and_validate(path, arg):
    module = _load(path)
    config = module.get_config(arg)
    assert (config.model.arch, config.text.encoder, config.model.size) == _name_fields(path)
    assert "python -m relcirc_jax.main" in module.__doc__
    validate_config(config, num_devices=8, process_count=1)


def test_paper_recipe_and_cpu_variant():
    paper, cpu = base_config("rte", "b"), base_config("rte", "micro", "cpu")
    assert (paper.train.lr, paper.train.weight_decay, paper.train.adam_eps) == (1e-4, 3e-2, 1e-10)
    assert (paper.train.warmup_steps, paper.train.grad_clip, paper.train.batch_size) == (500, 0.01, 256)
    assert (paper.eval.num_steps, paper.eval.cfg_scale, paper.eval.num_prompts) == (14, 4.5, 96)
    assert (paper.eval.prompt_set, paper.eval.images_per_prompt, paper.sample.negative) == (
        "paper_main",
        100,
        "empty_prompt",
    )
    assert (paper.data.task, paper.data.num_scenes, paper.train.num_steps) == ("paper", 10_000, 160_000)
    assert (cpu.data.task, cpu.data.num_scenes) == ("paper", None)
    assert cpu.train.batch_size == 64 and cpu.train.compute_dtype == "auto"
    assert (paper.model.prediction, paper.train.t_logit_mean) == ("eps", None)  # PixArt: eps, uniform timesteps
    assert (cpu.model.prediction, cpu.train.t_logit_mean) == ("x0", 0.0)


def test_bad_values_raise_one_error_naming_each():
    config = base_config("rte", "nano", "smoke")
    config.train.batch_size = 12
    config.train.num_steps = -3
    config.text.encoder = "clip"
    config.train.t_logit_std = 0.0
    config.parallel.cpu_devices = 0
    config.train.optimizer = "sgd"
    config.train.t_high_noise_share = 1.0
    config.train.lr_decay_fraction = -0.2
    config.data.curriculum_steps = -1
    config.data.curriculum_caption_mix = "easy"
    config.data.relations = "even"
    config.train.teacher_weight = 0.0
    config.checkpoint.keep_period = -1
    with pytest.raises(UserError) as error:
        validate_config(config, num_devices=8, process_count=1)
    message = str(error.value)
    assert "train.batch_size=12 is not divisible by the data-parallel size data*fsdp=8" in message
    assert "train.num_steps=-3 must be >= 1" in message
    assert "text.encoder='clip' is unknown" in message
    assert "train.t_logit_std=0.0 must be > 0" in message
    assert "parallel.cpu_devices=0 must be >= 1" in message
    assert "train.optimizer='sgd' is unknown; choose one of ('adamw', 'muon')" in message
    assert "train.t_high_noise_share=1.0 must be in [0, 1)" in message
    assert "train.lr_decay_fraction=-0.2 must be in [0, 1)" in message
    assert "data.curriculum_steps=-1 must be >= 0" in message
    assert "data.curriculum_caption_mix='easy' is unknown" in message
    assert "data.relations='even' is unknown; choose one of ('scene', 'uniform', 'straight_heavy')" in message
    assert "train.teacher_weight=0.0 must be in (0, 1]" in message
    assert "checkpoint.keep_period=-1 must be >= 0 (0: keep only the latest)" in message


def test_bad_model_sampler_and_analysis_values_are_named_before_anything_runs():
    config = base_config("rte", "nano", "smoke")
    config.model.prediction = "x1"
    config.model.depth = 0
    config.model.patch_size = 7
    config.model.num_heads = 3
    config.model.mlp_ratio = 0.0
    config.model.pos_embed_image_size = 60
    config.text.dim = 0
    config.eval.solver = "dpm"
    config.eval.cfg_scale = float("nan")
    config.analysis.images_per_prompt = 0
    with pytest.raises(UserError) as error:
        validate_config(config, num_devices=8, process_count=1)
    message = str(error.value)
    assert "model.prediction='x1' is unknown; choose one of ('eps', 'v', 'x0')" in message
    assert "model.depth=0 must be >= 1" in message and "text.dim=0 must be >= 1" in message
    assert "data.image_size=64 is not a multiple of model.patch_size=7" in message
    assert "model.hidden_size=32 is not a multiple of model.num_heads=3" in message
    assert "model.mlp_ratio=0.0 must be > 0" in message
    assert "model.pos_embed_image_size=60 must be a positive multiple of model.patch_size=7" in message
    assert "eval.solver='dpm' is unknown; choose one of ['ddim', 'dpmpp_2m', 'euler']" in message
    assert "eval.cfg_scale=nan must be a finite number" in message
    assert "analysis.images_per_prompt=0 must be >= 1" in message


def test_batch_must_split_over_processes_and_mesh_must_fit():
    config = base_config("rte", "nano", "smoke")
    with pytest.raises(UserError, match="not divisible by the process count 3"):
        validate_config(config, num_devices=1, process_count=3)
    config.parallel.mesh.fsdp = 3
    with pytest.raises(UserError, match="does not fit 8 devices"):
        validate_config(config, num_devices=8, process_count=1)
    config.parallel.mesh.fsdp = 1
    config.train.microbatches = 3  # batch 8 on 2 devices: microbatches of 8 / 3 images
    with pytest.raises(UserError, match=r"does not split into train.microbatches=3 .* a multiple of 6, or fewer"):
        validate_config(config, num_devices=2, process_count=1)
    config.train.microbatches = 0
    with pytest.raises(UserError, match="train.microbatches=0 must be >= 1"):
        validate_config(config, num_devices=2, process_count=1)


def test_unknown_encoder_size_or_variant():
    with pytest.raises(UserError, match="Unknown text encoder 'clip'"):
        base_config("clip", "b")
    with pytest.raises(UserError, match="Unknown DiT size 'xl'"):
        base_config("rte", "xl")
    with pytest.raises(UserError, match="Unknown config variant 'gpu'"):
        base_config("rte", "b", "gpu")


def _parse_config_flag(*args):
    argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'rte_dit_nano.py')}:smoke", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_overrides_and_the_explanation_of_bad_override_keys_and_values():
    config = _parse_config_flag("--config.train.lr=0.003", "--config.model.depth=1")
    assert config.train.lr == 0.003 and config.model.depth == 1
    argv = [
        "prog",
        f"--config={os.path.join(REPO, 'configs', 'rte_dit_nano.py')}:smoke",
        "--config.train.lr=1",
        "--config.train.learning_rate=0.003",
        "--config.modle.depth=1",
        "--config.model.depth=two",
        "--config.checkpoint.async_save=maybe",
        "--config.checkpoint.async_save=false",
    ]
    message = explain_config_flags(argv)
    assert "--config.train.learning_rate: train has no key 'learning_rate'; its keys are [" in message
    assert "'lr'" in message
    assert "--config.modle.depth: the top level has no key 'modle'" in message
    assert "--config.model.depth=two: model.depth takes an int (e.g. 2), not 'two'" in message
    assert "--config.checkpoint.async_save=maybe: checkpoint.async_save takes a bool" in message
    assert message.count("--config.") == 4  # the good overrides (lr=1, async_save=false) are not named
    assert explain_config_flags(argv[:2]) is None


def test_inf_lifts_a_variants_time_budget_from_the_command_line_where_none_cannot_be_typed():
    lifted = _parse_config_flag("--config.train.time_budget_minutes=inf")
    validate_config(lifted, num_devices=8, process_count=1)
    assert TimeBudget(lifted.train.time_budget_minutes).seconds_left() is None  # the loop logs "time budget none"
    assert not TimeBudget(lifted.train.time_budget_minutes).spent(0)
    with pytest.raises(UserError, match=r"time_budget_minutes=nan must be > 0, or inf \(None\) for no budget"):
        validate_config(_parse_config_flag("--config.train.time_budget_minutes=nan"), num_devices=8, process_count=1)
    argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'rte_dit_micro.py')}:long"]
    typed_none = explain_config_flags([*argv, "--config.train.time_budget_minutes=None"])
    assert typed_none == (
        "--config.train.time_budget_minutes=None: the command line cannot set None for a float key; pass inf for no "
        "budget."
    )
    assert "give a float (e.g. 0.0005) or set None in a config file" in explain_config_flags(
        [*argv, "--config.train.lr=none"]
    )
    base = [argv[0], argv[1].removesuffix(":long")]  # the base config leaves cpu_devices None (:long sets 2)
    none_by_default = explain_config_flags([*base, "--config.parallel.cpu_devices=None"])
    assert none_by_default.endswith("give an int or set None in a config file.")  # no "(e.g. None)" example


def test_the_early_flag_checks_read_absls_space_separated_spelling_too():
    from relcirc_jax import config_checks

    spaced = ["main", "--config", "configs/rte_dit_nano.py:smoke", "--config.eval.num_steps", "2", "--mode=train"]
    assert config_checks.overrides_without_config_problem(spaced) is None  # was: "no config was given"
    missing = config_checks.config_file_problem(["main", "--config", "configs/nope.py"])
    assert "'configs/nope.py' does not exist" in missing
    argv = ["main", "--init_from", "rte_dit_micro", "--config.eval.num_steps", "2"]
    assert config_checks.with_init_from_config(argv)[1].endswith("pretrained.py:rte_dit_micro")
    bad = ["main", "--config", "configs/rte_dit_nano.py:smoke", "--config.eval.num_step", "2"]
    assert "eval has no key 'num_step'" in explain_config_flags(bad)


def test_a_config_flag_naming_no_config_file_is_one_message(tmp_path):
    from relcirc_jax import config_checks

    assert "--config=README.md is not a Python config file" in config_checks.config_file_problem(
        ["main", "--config=README.md"]
    )
    assert "must define get_config(arg)" in explain_config_flags(["main", "--config=relcirc_jax/errors.py"])
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg:\n")
    assert "Running it raised SyntaxError" in explain_config_flags(["main", f"--config={broken}"])


@pytest.mark.parametrize("matrix_units", ["0", "1"], ids=["xla_dot", "gemm_library"])
def test_cpu_variants_plan_their_steps_for_the_dtype_their_train_step_will_use(monkeypatch, matrix_units):
    # RELCIRC_CPU_BF16_MATMUL=1 forces a gemm library's path on (tests/test_cpu_bf16_matmul.py), 0 turns it off
    monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, matrix_units)
    dtype = "bfloat16" if matrix_units == "1" else "float32"
    step_seconds = CPU_STEP_SECONDS[dtype]["micro"]
    for arg, budget in (("cpu", 3300), ("long", 8700), ("quick", 600)):
        config = base_config("rte", "micro", arg)
        assert config.train.compute_dtype == "auto" and config.train.time_budget_minutes * 60 == budget
        assert budget - 100 * step_seconds < config.train.num_steps * step_seconds <= budget  # whole hundreds
        assert train_state.compute_dtype(config, training=True) == dtype
        assert train_state.compute_dtype(config, training=False) == "float32"
    assert base_config("rte", "micro").train.compute_dtype == "float32"  # the paper's recipe: as asked, everywhere


def _flat(config, prefix=""):
    items = {}
    for key, value in config.items():
        items |= _flat(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key: value}
    return items


def test_cpu32_variant_is_the_cpu_hour_on_32_px_scenes_on_the_64_px_position_grid():
    cpu, cpu32 = _flat(base_config("rte", "micro", "cpu")), _flat(base_config("rte", "micro", "cpu32"))
    changed = {key: cpu32[key] for key in cpu if cpu[key] != cpu32[key]}
    planned = {"train.num_steps", "eval.every_steps", "sample.every_steps", "checkpoint.keep_period"}
    assert {key: value for key, value in changed.items() if key not in planned} == {
        "data.image_size": 32,
        "data.radius": 4,
        "model.pos_embed_image_size": 64,
        "train.microbatches": 1,
        "data.relations": "straight_heavy",
        "eval.cfg_scale": 2.0,
    }
    # the same budget, 1 / LOW_RESOLUTION_STEP_COST the steps, still 4 evaluations
    assert cpu32["train.time_budget_minutes"] == cpu["train.time_budget_minutes"]
    assert cpu32["train.num_steps"] == pytest.approx(cpu["train.num_steps"] / LOW_RESOLUTION_STEP_COST, rel=0.02)
    assert cpu32["train.num_steps"] // cpu32["eval.every_steps"] == 4


def test_long_variant_is_the_cpu_recipe_over_150_minutes_with_a_denser_curve():
    cpu, long = _flat(base_config("rte", "micro", "cpu")), _flat(base_config("rte", "micro", "long"))
    changed = {key for key in cpu if cpu[key] != long[key]}
    periods = {"eval.every_steps", "sample.every_steps", "checkpoint.keep_period"}
    assert changed == {"train.num_steps", "train.time_budget_minutes"} | periods
    assert all(run["checkpoint.keep_period"] == run["eval.every_steps"] for run in (cpu, long))  # dynamics sees each
    assert cpu["train.time_budget_minutes"] < long["train.time_budget_minutes"] <= 150
    evaluations = [run["train.num_steps"] // run["eval.every_steps"] for run in (cpu, long)]
    assert evaluations == [4, 10]
