"""Checks of a config and of the command line that sets it: every bad value in one UserError naming the fix
(`validate_config`), and one line for whatever made absl reject `--config=FILE[:variant]` or a `--config.KEY=VALUE`
override (`config_file_problem`, `explain_config_flags`; the CLI calls them on its error path only).
"""

import importlib.util
import math
import os
from typing import Sequence

import ml_collections

from relcirc_jax.config import (
    ANALYSIS_KINDS,
    ARCHS,
    DIVERSITY_GRIDS,
    DIVERSITY_METRICS,
    ENCODERS,
    NEGATIVES,
    OPTIMIZERS,
    PATCHING_CORRUPTIONS,
    SIZES,
    TRAIN_COMPUTE_DTYPES,
    diversity_m,
)
from relcirc_jax.errors import UserError
from relcirc_jax.parallel.rules import rule_problems, rules_from_config


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    process_count: int | None = None,
    check_mesh: bool = True,
) -> None:
    """Raises one UserError listing every bad value of `config` (and how to fix it); returns None when all is well.

    `num_devices`/`process_count` default to the current JAX runtime; they decide whether the batch splits evenly.
    check_mesh=False skips those checks (they would start JAX's backends; the CLI runs them later).
    """
    problems = _config_problems(config)
    if check_mesh:
        import jax

        num_devices = jax.device_count() if num_devices is None else num_devices
        process_count = jax.process_count() if process_count is None else process_count
        problems += _mesh_problems(config, num_devices, process_count)
    if len(problems) == 1:
        raise UserError(f"Invalid config: {problems[0]}")
    if problems:
        raise UserError("Invalid config:\n  - " + "\n  - ".join(problems))


def _config_problems(c: ml_collections.ConfigDict) -> list[str]:
    problems = []
    if c.text.encoder not in ENCODERS:
        problems.append(f"text.encoder={c.text.encoder!r} is unknown; choose one of {ENCODERS}.")
    if c.model.arch not in ARCHS:
        problems.append(f"model.arch={c.model.arch!r} is unknown; choose one of {ARCHS}.")
    if c.model.size not in SIZES:
        problems.append(f"model.size={c.model.size!r} is unknown; choose one of {SIZES}.")
    if c.train.compute_dtype not in TRAIN_COMPUTE_DTYPES:
        problems.append(
            f"train.compute_dtype={c.train.compute_dtype!r} is unknown; choose one of {TRAIN_COMPUTE_DTYPES}."
        )
    if c.train.optimizer not in OPTIMIZERS:
        problems.append(f"train.optimizer={c.train.optimizer!r} is unknown; choose one of {OPTIMIZERS}.")
    for key in (
        "train.num_steps",
        "train.batch_size",
        "train.microbatches",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "log.every_steps",
        "eval.every_steps",
        "eval.num_prompts",
        "eval.batch_size",
        "eval.num_steps",
        "sample.every_steps",
        "sample.num_prompts",
    ):
        if _get(c, key) < 1:
            problems.append(f"{key}={_get(c, key)} must be >= 1.")
    if c.checkpoint.keep_period < 0:
        problems.append(f"checkpoint.keep_period={c.checkpoint.keep_period} must be >= 0 (0: keep only the latest).")
    for key in ("train.lr", "train.grad_clip", "train.adam_eps", "train.t_logit_std"):
        if not _get(c, key) > 0:
            problems.append(f"{key}={_get(c, key)} must be > 0.")
    if c.train.time_budget_minutes is not None and not c.train.time_budget_minutes > 0:
        problems.append(
            f"train.time_budget_minutes={c.train.time_budget_minutes} must be > 0, or inf (None) for no budget."
        )
    if c.train.warmup_steps < 0 or c.train.weight_decay < 0:
        problems.append("train.warmup_steps and train.weight_decay must be >= 0.")
    for key in ("train.ema_decay", "train.caption_dropout", "train.t_high_noise_share", "train.lr_decay_fraction"):
        if not 0 <= _get(c, key) < 1:
            problems.append(f"{key}={_get(c, key)} must be in [0, 1).")
    try:
        problems += [
            f"parallel.logical_axis_rules: {p}."
            for p in rule_problems(rules_from_config(c.parallel.logical_axis_rules))
        ]
    except (TypeError, ValueError):
        problems.append(
            f"parallel.logical_axis_rules={c.parallel.logical_axis_rules!r} is not a sequence of (logical axis, mesh "
            "axes) pairs; see relcirc_jax/parallel/axes.py."
        )
    if not 0 < c.train.teacher_weight <= 1:
        problems.append(f"train.teacher_weight={c.train.teacher_weight} must be in (0, 1] (1: the teacher alone).")
    if c.parallel.cpu_devices is not None and c.parallel.cpu_devices < 1:
        problems.append(f"parallel.cpu_devices={c.parallel.cpu_devices} must be >= 1, or None for JAX's default.")
    problems += _model_problems(c) + _data_and_eval_problems(c)
    return problems


def _model_problems(c: ml_collections.ConfigDict) -> list[str]:
    from relcirc_jax.diffusion.parameterization import PREDICTIONS  # imports jax: only when a config is checked

    m, problems = c.model, []
    if m.prediction not in PREDICTIONS:
        problems.append(f"model.prediction={m.prediction!r} is unknown; choose one of {PREDICTIONS}.")
    sizes = {"model.hidden_size": m.hidden_size, "model.depth": m.depth, "model.num_heads": m.num_heads}
    sizes.update({"model.patch_size": m.patch_size, "text.dim": c.text.dim, "data.image_size": c.data.image_size})
    problems += [f"{key}={value} must be >= 1." for key, value in sizes.items() if value is not None and value < 1]
    if m.patch_size >= 1 and c.data.image_size >= 1 and c.data.image_size % m.patch_size:
        problems.append(
            f"data.image_size={c.data.image_size} is not a multiple of model.patch_size={m.patch_size}; the image "
            "must split into whole patches."
        )
    span = m.get("pos_embed_image_size")
    if span is not None and (span < 1 or (m.patch_size >= 1 and span % m.patch_size)):
        problems.append(
            f"model.pos_embed_image_size={span} must be a positive multiple of model.patch_size={m.patch_size} (the "
            "image size whose token grid the position embedding spans, e.g. 64), or None for the image's own."
        )
    if (m.hidden_size or 0) >= 1 and (m.num_heads or 0) >= 1 and m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size={m.hidden_size} is not a multiple of model.num_heads={m.num_heads}.")
    if not m.mlp_ratio > 0:
        problems.append(f"model.mlp_ratio={m.mlp_ratio} must be > 0.")
    return problems


def _data_and_eval_problems(c: ml_collections.ConfigDict) -> list[str]:
    from relcirc_jax.data import dataset  # the data package is heavier than this module needs at import
    from relcirc_jax.diffusion.samplers import SOLVERS

    problems = []
    if c.data.task not in dataset.TASKS:
        problems.append(f"data.task={c.data.task!r} is unknown; choose one of {dataset.TASKS}.")
    if c.data.caption_mix is not None and c.data.caption_mix not in dataset.CAPTION_MIXES:
        problems.append(
            f"data.caption_mix={c.data.caption_mix!r} is unknown; choose one of "
            f"{sorted(dataset.CAPTION_MIXES)} or None (the task's own)."
        )
    if c.data.relations is not None and c.data.relations not in dataset.RELATION_DRAWS:
        problems.append(
            f"data.relations={c.data.relations!r} is unknown; choose one of {dataset.RELATION_DRAWS} or None (the "
            "task's own)."
        )
    if c.data.curriculum_caption_mix not in dataset.CAPTION_MIXES:
        problems.append(
            f"data.curriculum_caption_mix={c.data.curriculum_caption_mix!r} is unknown; choose one of "
            f"{sorted(dataset.CAPTION_MIXES)}."
        )
    if c.data.curriculum_steps < 0:
        problems.append(f"data.curriculum_steps={c.data.curriculum_steps} must be >= 0 (0 = no curriculum).")
    if c.data.num_scenes is not None and c.data.num_scenes < 1:
        problems.append(f"data.num_scenes={c.data.num_scenes} must be >= 1, or None for fresh scenes every step.")
    if c.analysis.kind not in ANALYSIS_KINDS:
        problems.append(f"analysis.kind={c.analysis.kind!r} is unknown; choose one of {ANALYSIS_KINDS}.")
    if c.analysis.ablation_mode not in ("zero", "mean", "both"):
        problems.append(
            f"analysis.ablation_mode={c.analysis.ablation_mode!r} is unknown; use 'zero', 'mean' or 'both'."
        )
    if c.analysis.patching_corruption not in PATCHING_CORRUPTIONS:
        problems.append(
            f"analysis.patching_corruption={c.analysis.patching_corruption!r} is unknown; use one of "
            f"{PATCHING_CORRUPTIONS}."
        )
    if c.analysis.diversity_grid not in DIVERSITY_GRIDS:
        problems.append(
            f"analysis.diversity_grid={c.analysis.diversity_grid!r} is unknown; use one of {DIVERSITY_GRIDS}."
        )
    if c.analysis.diversity_metric not in DIVERSITY_METRICS:
        problems.append(
            f"analysis.diversity_metric={c.analysis.diversity_metric!r} is unknown; use one of {DIVERSITY_METRICS}."
        )
    if c.analysis.diversity_prompts < 1 or c.analysis.diversity_groups < 1 or c.analysis.diversity_group_size < 2:
        problems.append(
            "analysis.diversity_prompts and diversity_groups must be >= 1 and diversity_group_size >= 2 (got "
            f"{c.analysis.diversity_prompts}, {c.analysis.diversity_groups}, {c.analysis.diversity_group_size})."
        )
    try:
        diversity_m(c.analysis.diversity_group_size, c.analysis.diversity_m)
    except ValueError as error:
        problems.append(str(error))
    if c.analysis.probe_prompts < 4 or c.analysis.probe_images < 2:
        problems.append(
            "analysis.probe_prompts must be >= 4 (the probes' folds are whole prompts) and probe_images >= 2 (a "
            f"layout deviation needs two samples of a prompt); got {c.analysis.probe_prompts}, "
            f"{c.analysis.probe_images}."
        )
    if c.analysis.ablation_top_heads < 0:
        problems.append(f"analysis.ablation_top_heads={c.analysis.ablation_top_heads} must be >= 0 (0 = skip).")
    if c.analysis.patching_prompts < 1:
        problems.append(f"analysis.patching_prompts={c.analysis.patching_prompts} must be >= 1.")
    if not 1 <= c.analysis.patching_windows <= c.eval.num_steps:
        problems.append(
            f"analysis.patching_windows={c.analysis.patching_windows} must be in [1, eval.num_steps="
            f"{c.eval.num_steps}]."
        )
    if c.eval.solver not in SOLVERS:
        problems.append(f"eval.solver={c.eval.solver!r} is unknown; choose one of {sorted(SOLVERS)}.")
    if not math.isfinite(c.eval.cfg_scale):
        problems.append(f"eval.cfg_scale={c.eval.cfg_scale} must be a finite number (1 = no guidance).")
    if c.analysis.images_per_prompt < 1:
        problems.append(f"analysis.images_per_prompt={c.analysis.images_per_prompt} must be >= 1.")
    if c.sample.negative not in NEGATIVES:
        problems.append(f"sample.negative={c.sample.negative!r} is unknown; choose one of {NEGATIVES}.")
    if c.eval.images_per_prompt < 1:
        problems.append(f"eval.images_per_prompt={c.eval.images_per_prompt} must be >= 1.")
    if c.eval.prompt_set not in dataset.EVAL_SETS:
        problems.append(f"eval.prompt_set={c.eval.prompt_set!r} is unknown; choose one of {sorted(dataset.EVAL_SETS)}.")
    elif not 1 <= c.eval.num_prompts <= (available := len(dataset.eval_prompts(c.eval.prompt_set))):
        problems.append(f"eval.num_prompts={c.eval.num_prompts} must be in [1, {available}] for {c.eval.prompt_set!r}.")
    return problems


def _mesh_problems(c: ml_collections.ConfigDict, num_devices: int, process_count: int) -> list[str]:
    from relcirc_jax.parallel.axes import BATCH_AXES, MESH_AXES  # like data above: only when the mesh is checked
    from relcirc_jax.parallel.mesh import mesh_shape

    try:
        sizes = dict(zip(MESH_AXES, mesh_shape(c.parallel.mesh, num_devices, name="parallel.mesh")))
    except ValueError as e:
        return [str(e)]
    batch_shards = math.prod(sizes[axis] for axis in BATCH_AXES)
    problems = []
    if c.train.batch_size % batch_shards:
        problems.append(
            f"train.batch_size={c.train.batch_size} is not divisible by the data-parallel size "
            f"data*fsdp={batch_shards}; pick a multiple of {batch_shards}."
        )
    elif c.train.microbatches >= 1 and c.train.batch_size % (c.train.microbatches * batch_shards):
        problems.append(
            f"train.batch_size={c.train.batch_size} does not split into train.microbatches={c.train.microbatches} "
            f"microbatches of a multiple of the data-parallel size data*fsdp={batch_shards}; pick a batch size that "
            f"is a multiple of {c.train.microbatches * batch_shards}, or fewer microbatches."
        )
    if c.train.batch_size % process_count:
        problems.append(
            f"train.batch_size={c.train.batch_size} is not divisible by the process count "
            f"{process_count}; pick a multiple of {process_count}."
        )
    return problems


def _get(c: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c


def _equals_form(argv: Sequence[str], flag_name: str) -> list[str]:
    """`argv` with absl's other spelling of the flags read here, `--config FILE`, `--config.a.b V` and
    `--init_from MODEL`, joined into `--name=value` (only for reading them; absl parses both)."""
    joined, i = [], 0
    while i < len(argv):
        arg = argv[i]
        takes_value = arg in (f"--{flag_name}", "--init_from") or (arg.startswith(f"--{flag_name}.") and "=" not in arg)
        if takes_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            joined.append(f"{arg}={argv[i + 1]}")
            i += 2
        else:
            joined.append(arg)
            i += 1
    return joined


def _config_file_arg(argv: Sequence[str], flag_name: str) -> tuple[str, str] | None:
    """(path, variant) of the last `--config=FILE[:variant]` (or `--config FILE[:variant]`) in `argv`, or None."""
    files = [a.split("=", 1)[1] for a in _equals_form(argv, flag_name) if a.startswith(f"--{flag_name}=")]
    if not files:
        return None
    path, _, variant = files[-1].partition(":")
    return path, variant


def _override_args(argv: Sequence[str], flag_name: str) -> list[str]:
    """The `--config.a.b=v` arguments of `argv` (`--config.a.b v` joined into that form)."""
    return [a for a in _equals_form(argv, flag_name) if a.startswith(f"--{flag_name}.")]


def with_init_from_config(argv: Sequence[str], flag_name: str = "config") -> list[str]:
    """`argv`, plus `--config=relcirc_jax/pretrained.py:MODEL` (`pretrained.get_config`) when it overrides config
    values (`--config.a.b=v`) without a --config but with --init_from=MODEL: the overrides then apply to the reference
    model's own config, the one the run would use anyway. A diffusers PixArt --init_from brings no config and is left
    to its own error."""
    from relcirc_jax import pretrained

    argv = list(argv)
    overrides = _override_args(argv, flag_name)
    models = [a.split("=", 1)[1] for a in _equals_form(argv, flag_name) if a.startswith("--init_from=")]
    if not overrides or _config_file_arg(argv, flag_name) or not models or pretrained.is_pixart(models[-1]):
        return argv
    return argv[:1] + [f"--{flag_name}={pretrained.__file__}:{models[-1]}"] + argv[1:]  # absl: before overrides


def overrides_without_config_problem(argv: Sequence[str], flag_name: str = "config") -> str | None:
    """`--config.a.b=v` overrides given with nothing to override (no --config, and no --init_from that brings one)."""
    given = [a.split("=", 1)[0] for a in _override_args(argv, flag_name)]
    if not given or _config_file_arg(argv, flag_name):
        return None
    return (
        f"{given[0]} overrides a value of a config, but no config was given. Fix: add "
        f"--{flag_name}=configs/<model>.py[:variant], or --init_from=pretrained/NAME (its own config is overridden)."
    )


def config_file_problem(argv: Sequence[str], flag_name: str = "config") -> str | None:
    """What is wrong with `--config=FILE[:variant]` in `argv` that absl would only report later or as a traceback:
    the file is missing. None when it exists (or no --config is given)."""
    arg = _config_file_arg(argv, flag_name)
    if arg and not os.path.isfile(arg[0]):
        return f"Config file {arg[0]!r} does not exist; pass e.g. --config=configs/rte_dit_micro.py:cpu."
    if arg and not arg[0].endswith(".py"):
        return f"--config={arg[0]} is not a Python config file; pass e.g. --config=configs/rte_dit_micro.py:cpu."
    return None


def explain_config_flags(argv: Sequence[str], flag_name: str = "config") -> str | None:
    """One message for whatever made absl reject the config flags in `argv`, or None if none is found here.

    Loads the config file again (only on this error path) and checks, in order: the file exists, the ':variant' is
    known, every `--config.a.b=v` override names an existing key, and `v` parses as that key's type.
    """
    arg = _config_file_arg(argv, flag_name)
    problem = config_file_problem(argv, flag_name)
    if problem or not arg:
        return problem
    path, variant = arg
    spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(spec)
    not_a_config = (
        f"--config={path} is not a config file (it must define get_config(arg)); pass e.g. "
        "--config=configs/rte_dit_micro.py:cpu."
    )
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - whatever running the file raised, the file is the problem
        return f"{not_a_config} Running it raised {type(error).__name__}: {error}"
    if not callable(getattr(module, "get_config", None)):
        return not_a_config
    try:
        config = module.get_config(variant or None)
    except UserError as error:
        return str(error)
    overrides = [a[len(flag_name) + 3 :].split("=", 1) for a in _override_args(argv, flag_name)]
    problems = [
        _unknown_key_problem(config, key) or _override_type_problem(config, key, value)
        for key, value in (o if len(o) == 2 else (o[0], None) for o in overrides)
    ]
    problems = [p for p in problems if p]
    return " ".join(problems) if problems else None


# What a command line passes for None, for the typed keys whose None means something.
NONE_SPELLINGS = {"train.time_budget_minutes": "pass inf for no budget"}


def _override_type_problem(config: ml_collections.ConfigDict, dotted: str, value: str | None) -> str | None:
    """`value` does not parse as the type of config key `dotted` (ml_collections keeps a key's type)."""
    *parents, leaf = dotted.split(".")
    node = _get(config, ".".join(parents)) if parents else config
    expected = node.get_type(leaf)
    parse = {float: float, int: int, bool: lambda v: {"true": 1, "false": 0, "1": 1, "0": 0}[v.lower()]}.get(expected)
    kind = {float: "a float", int: "an int", bool: "a bool (true or false)"}.get(expected)
    if value is None or parse is None:
        return None
    try:
        parse(value)
    except (ValueError, KeyError):
        if value.lower() == "none":  # ml_collections parses an override as the key's type; None is no such value
            example = "" if node[leaf] is None else f" (e.g. {node[leaf]!r})"
            instead = NONE_SPELLINGS.get(dotted, f"give {kind}{example} or set None in a config file")
            return f"--config.{dotted}=None: the command line cannot set None for {kind} key; {instead}."
        return f"--config.{dotted}={value}: {dotted} takes {kind} (e.g. {node[leaf]!r}), not {value!r}; fix the value."
    return None


def _unknown_key_problem(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    node, seen = config, []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(seen) or "the top level"
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            return f"--config.{dotted}: {where} has no key {part!r}; its keys are {keys}."
        node, seen = node[part], seen + [part]
    return None
