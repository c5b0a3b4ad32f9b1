"""The training state (params, optimizer state, EMA params, step), the optimizer, and their shardings on a mesh."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import struct

from relcirc_jax import pretrained
from relcirc_jax.config_checks import validate_config
from relcirc_jax.errors import UserError
from relcirc_jax.models import arch, cpu_bf16_matmul
from relcirc_jax.parallel import rules as sharding_rules
from relcirc_jax.parallel.mesh import make_mesh
from relcirc_jax.text.conditioner import make_text_conditioner
from relcirc_jax.train import checkpoint


@struct.dataclass
class TrainState:
    """Everything a checkpoint holds. `step` counts optimizer updates applied so far (the next batch index)."""

    params: Any
    opt_state: Any
    ema_params: Any
    step: jax.Array


def model_config(config: ml_collections.ConfigDict, caption_channels: int) -> arch.ModelConfig:
    """The model config of `config.model` (its arch and size; None fields keep the size's defaults), training dtype
    and remat included."""
    overrides = {k: v for k, v in config.model.items() if k not in ("arch", "size") and v is not None}
    return arch.model_config(
        config.model.arch,
        config.model.size,
        image_size=config.data.image_size,
        caption_channels=caption_channels,
        dtype=compute_dtype(config, training=False),
        remat=config.train.remat,
        **overrides,
    )


def compute_dtype(config: ml_collections.ConfigDict, *, training: bool) -> str:
    """The DiT's compute dtype: train.compute_dtype, or for "auto" bfloat16 in the train step where the CPU backend's
    bfloat16 products run on its matrix units (models/cpu_bf16_matmul.py) and float32 otherwise. Under "auto",
    sampling, evaluation and analyses compute in float32, so their figures do not depend on the machine; GPU and TPU
    train in float32 unless asked (so the reference models' commands reproduce)."""
    dtype = config.train.compute_dtype
    if dtype != "auto":
        return dtype
    matrix_units = training and jax.default_backend() == "cpu" and cpu_bf16_matmul.enabled()
    return "bfloat16" if matrix_units else "float32"


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to train.lr over train.warmup_steps (0 = none), then constant (PixArt's schedule). With
    train.lr_decay_fraction = f > 0, the last f * train.num_steps steps decay it linearly to 0 (warm-up, stable,
    decay): the last update gets lr / decay_steps."""
    t = config.train
    if t.warmup_steps == 0:
        base = optax.constant_schedule(t.lr)
    else:
        base = optax.warmup_constant_schedule(0.0, t.lr, t.warmup_steps)
    num_steps, decay_steps = t.num_steps, round(t.lr_decay_fraction * t.num_steps)
    if decay_steps == 0:
        return base
    return lambda step: base(step) * jnp.clip((num_steps - step) / decay_steps, 0.0, 1.0)


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW on every parameter (train.optimizer="adamw"), or Muon on the hidden
    matrices and the same AdamW on the rest ("muon", see optimizer_groups)."""
    t = config.train
    adamw = optax.adamw(learning_rate(config), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
    # Muon's own defaults (Nesterov momentum 0.95, 5 Newton-Schulz steps); consistent_rms=0.2 scales each
    # orthogonalised update to AdamW's typical RMS, so one lr serves both groups.
    muon = optax.contrib.muon(learning_rate(config), weight_decay=t.weight_decay, consistent_rms=0.2)
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip), optax.partition({"muon": muon, "adamw": adamw}, optimizer_groups)
    )


def optimizer_groups(params):
    """ "muon" for the hidden matrices, the 2-D kernels inside the transformer blocks (attention, MLP, modulation);
    "adamw" for the rest: the patch, timestep and caption embeddings, the output layer and every vector, as Muon's
    recipe keeps them."""

    def group(path, leaf):
        names = [str(getattr(key, "key", key)) for key in path]
        hidden = leaf.ndim == 2 and names[-1] == "kernel" and names[0].startswith("transformer_blocks_")
        return "muon" if hidden else "adamw"

    return jax.tree_util.tree_map_with_path(group, params)


def init_state(model_cfg: arch.ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state: model params from `seed`, EMA = params, step 0. Jit it with `state_shardings` as out_shardings."""
    params = arch.init_params(model_cfg, jax.random.PRNGKey(seed))
    return TrainState(params=params, opt_state=tx.init(params), ema_params=params, step=jnp.zeros((), jnp.int32))


def state_shardings(
    model_cfg: arch.ModelConfig,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    seed: int = 0,
    rules: sharding_rules.Rules = sharding_rules.DEFAULT_RULES,
):
    """(abstract state, its shardings): params, EMA and optimizer moments follow the model's logical axes through
    `rules`, the rest (step, Adam counts) is replicated."""
    abstract = jax.eval_shape(lambda: init_state(model_cfg, tx, seed))
    param_sh = sharding_rules.param_shardings(abstract.params, arch.logical_specs(model_cfg), mesh, rules)
    replicated = sharding_rules.replicated(mesh)
    # A partitioned optimizer (Muon + AdamW) keeps each group's moments as the params tree with MaskedNode in the
    # other group's places; those stay MaskedNode (empty pytrees).
    masked = lambda leaf: isinstance(leaf, optax.MaskedNode)
    opt_sh = optax.tree_map_params(
        tx,
        lambda leaf, sh: leaf if masked(leaf) else sh,
        abstract.opt_state,
        param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )
    shardings = TrainState(params=param_sh, opt_state=opt_sh, ema_params=param_sh, step=replicated)
    return abstract, shardings


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying their target shardings (what checkpoint restore onto the current mesh needs)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class RunSetup(NamedTuple):
    """What every mode (train, sample, evaluate) builds from a config: the mesh, text conditioner, model, optimizer,
    the state's abstract shapes and shardings, and the checkpointer of the workdir."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    conditioner: Any
    tables: Any  # the conditioner's constant tables, replicated on the mesh
    model_cfg: arch.ModelConfig
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    checkpointer: checkpoint.Checkpointer


def build_run_setup(config: ml_collections.ConfigDict, workdir, devices=None) -> RunSetup:
    """Validates `config` and builds the run's pieces on `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    validate_config(config, num_devices=len(devices))
    mesh = make_mesh(dict(config.parallel.mesh), devices)
    conditioner = make_text_conditioner(
        config.text.encoder,
        seed=config.text.seed,
        dim=config.text.dim,
        position_scale=config.text.position_scale,
        t5_path=config.text.t5_path,
        workdir=str(workdir),
    )
    tables = jax.device_put(conditioner.tables, sharding_rules.replicated(mesh))
    model_cfg = model_config(config, caption_channels=conditioner.dim)
    tx = optimizer(config)
    rules = sharding_rules.rules_from_config(config.parallel.logical_axis_rules)
    abstract, shardings = state_shardings(model_cfg, tx, mesh, config.seed, rules)
    checkpointer = checkpoint.Checkpointer(
        epath.Path(workdir) / "checkpoints",
        save_every=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
        keep_period=config.checkpoint.keep_period,
        async_save=config.checkpoint.async_save,
    )
    return RunSetup(
        config, mesh, conditioner, tables, model_cfg, tx, with_shardings(abstract, shardings), shardings, checkpointer
    )


def initial_state(setup: RunSetup) -> TrainState:
    """init_state of the setup's model from config.seed, computed straight into its state_shardings on the mesh."""
    init = jax.jit(init_state, static_argnums=(0, 1, 2), out_shardings=setup.state_shardings)
    return init(setup.model_cfg, setup.tx, setup.config.seed)


def require_checkpoint(workdir, step: int | None = None) -> None:
    """UserError unless `workdir` holds checkpoint `step` (default: any); reads the directory, creates nothing."""
    directory = epath.Path(workdir) / "checkpoints"
    steps = checkpoint.saved_steps(directory)
    if not steps:
        raise UserError(
            f"No checkpoint in {directory}. Train first: python -m relcirc_jax.main --config=<the same "
            f"config> --workdir={workdir} --mode=train"
        )
    if step is not None and step not in steps:
        raise UserError(
            f"No checkpoint of step {step} in {directory}; available steps: {steps}. Fix: pass one of "
            "them to --step, or leave it out for the latest."
        )


def require_weights(config: ml_collections.ConfigDict, workdir, step: int | None = None) -> None:
    """UserError unless there are weights to use: checkpoint `step` (default any) in `workdir`, or, when the workdir has
    none, the reference model config.init_from names. Reads, creates nothing."""
    if _uses_reference_model(config, workdir):
        if config.get("init_transfer"):
            raise UserError(
                f"{workdir} has no checkpoint, and --config.init_transfer=True loads only part of "
                f"{config.init_from} (its text encoder differs). Fix: train first (--mode=train)."
            )
        if step is not None:
            raise UserError(
                f"--step={step} needs a checkpoint in {workdir}; a reference model has one step. Fix: drop --step."
            )
        pretrained.model_dir(config.init_from)
        return
    require_checkpoint(workdir, step)


def ema_weights(setup: RunSetup, workdir, step: int | None = None) -> tuple[int, Any]:
    """(step, EMA params on the mesh) of checkpoint `step` (default the latest) of `workdir`, or of the reference model
    config.init_from when the workdir has no checkpoint (step: the one it was exported from)."""
    if _uses_reference_model(setup.config, workdir):
        reference_config, params = pretrained.load(setup.config.init_from)
        return reference_config.get("pretrained_step", 0), place_params(setup, params)
    step, state = restore_or_fail(setup, workdir, step)
    return step, state.ema_params


def place_params(setup: RunSetup, params) -> Any:
    """Host params (e.g. a reference model's) checked against the setup's model and put on its mesh."""
    pretrained.check_compatible(params, setup.abstract_state.ema_params)
    return jax.device_put(params, setup.state_shardings.ema_params)


def _uses_reference_model(config: ml_collections.ConfigDict, workdir) -> bool:
    """config.init_from names a reference model and the workdir has no checkpoint of its own (which would win)."""
    return bool(config.get("init_from")) and not checkpoint.saved_steps(epath.Path(workdir) / "checkpoints")


def check_model_before_restore(setup: RunSetup, step: int | None = None) -> None:
    """check_same_model on checkpoint `step`'s (default the latest's) meta alone, before any array is read: another
    model's checkpoint is refused with the differing fields named, not with Orbax's shape errors after retries."""
    step = setup.checkpointer.latest_step() if step is None else step
    meta = None if step is None else setup.checkpointer.read_meta(step)
    if meta is not None:
        check_same_model(setup, step, meta)


def restore_or_fail(setup: RunSetup, workdir, step: int | None = None) -> tuple[int, TrainState]:
    """(step, state) of checkpoint `step` (default the latest); a UserError when the workdir has none or when the
    checkpoint is another model than the config's (check_same_model)."""
    require_checkpoint(workdir, step)
    check_model_before_restore(setup, step)
    if step is None:
        step, state, meta = setup.checkpointer.restore_latest(setup.abstract_state)
    else:
        state, meta = setup.checkpointer.restore(step, setup.abstract_state)
    check_same_model(setup, step, meta)
    return step, state


# What a checkpoint's state is: the model (pretrained.MODEL_FIELDS) and the optimizer, whose state it holds.
STATE_FIELDS = pretrained.MODEL_FIELDS + ("train.optimizer",)


def check_same_model(setup: RunSetup, step: int, meta: dict) -> None:
    """UserError when checkpoint `step` (its `meta`) was trained as another model, or with another optimizer, than
    setup.config describes (STATE_FIELDS: e.g. another text encoder with the same parameter shapes, which would load
    silently, or other shapes, which Orbax would refuse only after its retries)."""
    saved = pretrained.config_from_dict(meta["config"])
    differences = pretrained.config_differences(setup.config, saved, STATE_FIELDS, any_resolution=True)
    if differences:
        raise UserError(
            f"The checkpoint of step {step} in {setup.checkpointer.directory} was trained as another model (or with "
            f"another optimizer) than this config describes: {'; '.join(differences)} (this config's value vs the "
            "checkpoint's). Fix: pass the config file and overrides the run was trained with (WORKDIR/config.txt lists "
            "its config), or use another --workdir."
        )
