"""Trained reference models as small files: the EMA weights of a run in bfloat16 safetensors beside its config.

A model directory (e.g. `pretrained/rte_dit_micro/`) holds `model.safetensors` (every DiT parameter, keys
"transformer_blocks_0/attn1/to_q/kernel", bfloat16), `config.json` (the run's full config) and `README.md` (the command
that trained it and its evaluation table). `load(name)` returns the config and float32 parameters; the CLI takes
`--init_from=pretrained/NAME`.

`--init_from` also takes a diffusers PixArtTransformer2DModel directory (config.json +
diffusion_pytorch_model.safetensors, e.g. a PixArt trained elsewhere; any depth, width, heads and patch size): its
sizes replace the config's model fields (`pixart_config`), and its weights load through models.convert. The run's
--config still chooses the text encoder, whose width must be the checkpoint's caption_channels (T5 captions for PixArt).

Export a trained run:  python -m relcirc_jax.pretrained --workdir=RUN --out=pretrained/NAME [--step=N]
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from relcirc_jax.errors import UserError, fail

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The repository's own reference models (pretrained/ beside the package); a name resolves here first.
REPO_MODELS_DIR = epath.Path(__file__).resolve().parent.parent / "pretrained"
_SEPARATOR = "/"


def is_pixart(path) -> bool:
    """Whether `path` is a diffusers PixArt transformer directory (rather than one of our reference models)."""
    from relcirc_jax.models.convert import WEIGHT_FILE

    directory = epath.Path(path)
    return (directory / WEIGHT_FILE).exists() or (directory / f"{WEIGHT_FILE}.index.json").exists()


def model_dir(name: str) -> epath.Path:
    """The directory of a reference model: a path holding model.safetensors, or a name under pretrained/ (or a
    diffusers PixArt directory)."""
    if is_pixart(name):
        return epath.Path(name)
    for candidate in (epath.Path(name), REPO_MODELS_DIR / name, REPO_MODELS_DIR / epath.Path(name).name):
        if (candidate / WEIGHTS_FILE).exists() and (candidate / CONFIG_FILE).exists():
            return candidate
    shipped = (
        sorted(p.name for p in REPO_MODELS_DIR.iterdir() if (p / WEIGHTS_FILE).exists())
        if REPO_MODELS_DIR.is_dir()
        else []
    )
    raise UserError(
        f"No reference model {name!r}: expected a directory with {WEIGHTS_FILE} and {CONFIG_FILE}. "
        f"Fix: pass one of {shipped} (under {REPO_MODELS_DIR}) or a directory written by "
        "`python -m relcirc_jax.pretrained --workdir=RUN --out=DIR`."
    )


def flatten(tree) -> dict:
    """{"a/b/kernel": leaf} of nested dicts (params, or a config's to_dict(), whose lists and tuples are leaves)."""
    is_sequence = lambda x: isinstance(x, (list, tuple))  # noqa: E731
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sequence)[0]:
        flat[_SEPARATOR.join(str(k.key) for k in path)] = leaf
    return flat


def unflatten(flat: dict) -> dict:
    tree = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(_SEPARATOR)
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def save(params, config: ml_collections.ConfigDict, out_dir, readme: str | None = None) -> epath.Path:
    """Writes `params` as bfloat16 safetensors, `config` as JSON and an optional README.md into `out_dir`."""
    from safetensors.flax import save_file

    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = {k: jnp.asarray(jax.device_get(v), jnp.bfloat16) for k, v in flatten(params).items()}
    save_file(flat, str(out_dir / WEIGHTS_FILE), metadata={"format": "relcirc_jax", "dtype": "bfloat16"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    if readme is not None:
        (out_dir / "README.md").write_text(readme)
    return out_dir


def load_config(name: str) -> tuple[ml_collections.ConfigDict, epath.Path]:
    """(config, directory) of a reference model: a name under pretrained/ or a model directory. Its saved config is
    laid over today's full config of its encoder and size, so fields added since it was exported get their defaults."""
    directory = model_dir(name)
    return saved_config(directory / CONFIG_FILE), directory


def get_config(name: str) -> ml_collections.ConfigDict:
    """This file as an ml_collections config file: `--config=relcirc_jax/pretrained.py:NAME` is reference model
    NAME's own config. The CLI passes it when `--config.*` overrides come with --init_from and no --config."""
    return load_config(name)[0]


def saved_config(path) -> ml_collections.ConfigDict:
    """A config.json written by a run or an export, laid over today's full config of its encoder and size."""
    return config_from_dict(json.loads(epath.Path(path).read_text()))


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A saved config (a run's config.json, a checkpoint's meta) laid over today's full config of its encoder and
    size."""
    from relcirc_jax.config import base_config

    config = base_config(saved["text"]["encoder"], saved["model"]["size"])
    config.unlock()
    config.update(saved)
    return config


# The config fields that define a model's parameters and what its outputs mean, less where its weights are read from.
MODEL_FIELDS = ("model", "text", "data.image_size")
LOCATION_FIELDS = ("text.t5_path",)
# Those that must still agree when config.init_transfer swaps the text encoder.
TRANSFER_FIELDS = ("model", "data.image_size")


# The fields a model may change between runs when its position embedding keeps its span (progressive resolution).
RESOLUTION_FIELDS = ("data.image_size", "model.pos_embed_image_size")


def config_differences(
    config: ml_collections.ConfigDict,
    reference: ml_collections.ConfigDict,
    fields=MODEL_FIELDS,
    *,
    any_resolution: bool = False,
) -> list[str]:
    """'key: value vs reference value' for every model-defining field (`fields`) where the configs differ, with the
    sizes a `model.size` implies filled in (a reference's saved config keeps them None). With `any_resolution`, the
    image size may differ where both position embeddings span the same image size (position_span): the weights of a
    model trained at 32 px with model.pos_embed_image_size=64 go on at 64 px (and back)."""
    mine, theirs = flatten(_with_sizes(config)), flatten(_with_sizes(reference))
    prefixes = [field.replace(".", _SEPARATOR) for field in fields]
    locations = {field.replace(".", _SEPARATOR) for field in LOCATION_FIELDS}
    if any_resolution and position_span(config) == position_span(reference):
        locations |= {field.replace(".", _SEPARATOR) for field in RESOLUTION_FIELDS}
    keys = [
        k
        for k in sorted(set(mine) | set(theirs))
        if any(k == p or k.startswith(p + _SEPARATOR) for p in prefixes) and k not in locations
    ]
    return [
        f"{k.replace('/', '.')}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)
    ]


def position_span(config: ml_collections.ConfigDict) -> int:
    """The image size whose token grid the model's position embedding spans (models.dit.PatchTransformerConfig)."""
    return config.model.get("pos_embed_image_size") or config.data.image_size


def _with_sizes(config: ml_collections.ConfigDict) -> dict:
    """`config` as a dict whose None model fields hold the values its `model.size` gives them."""
    from relcirc_jax.models import arch

    tree = config.to_dict()
    model = tree["model"]
    try:
        sized = arch.model_config(model["arch"], model["size"])
    except ValueError:  # an unknown arch or size: left to the config's validation, which names it
        return tree
    model.update({key: getattr(sized, key) for key, value in model.items() if value is None and hasattr(sized, key)})
    return tree


def pixart_config(config: ml_collections.ConfigDict, path) -> ml_collections.ConfigDict:
    """`config` with its model fields and image size replaced by those of the diffusers PixArt checkpoint `path`."""
    from relcirc_jax.models import convert

    with open(epath.Path(path) / "config.json") as f:
        model_cfg = convert.dit_config_from_diffusers(json.load(f))
    config = ml_collections.ConfigDict(config.to_dict())
    fields = ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "learn_sigma", "in_channels")
    config.model.update({name: getattr(model_cfg, name) for name in fields})
    config.model.arch = "pixart"
    config.model.prediction = "eps"  # what PixArt predicts
    config.data.image_size = model_cfg.image_size
    if config.sample.negative == "learned_null" and not convert.has_null_caption(str(path)):
        raise UserError(
            f"--config.sample.negative=learned_null, but the PixArt checkpoint {path} has no learned null caption "
            f"({convert.NULL_CAPTION}: diffusers' PixArtTransformer2DModel does not keep it), so the negative would be "
            "random. Fix: use --config.sample.negative=empty_prompt (the default), or add the checkpoint's "
            f"{convert.NULL_CAPTION} [max_text_len, caption_channels] to its safetensors."
        )
    return config


def _load_pixart(path) -> dict:
    from relcirc_jax.data.tokenizer import MAX_LEN
    from relcirc_jax.models import convert

    return convert.load_pixart_checkpoint(str(path), max_text_len=MAX_LEN)[1]


def load(name: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, float32 params) of a reference model: a name under pretrained/ or a model directory (a PixArt
    directory's config is the t5 DiT-B recipe with the checkpoint's sizes)."""
    from relcirc_jax.config import base_config
    from relcirc_jax.hf_weights import read_weights

    if is_pixart(name):
        return pixart_config(base_config("t5", "b"), name), _load_pixart(name)
    config, directory = load_config(name)
    flat = read_weights(str(directory))
    return config, unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})


def check_compatible(params, expected) -> None:
    """UserError naming the first parameter whose shape differs between a loaded model and the config's model."""
    got, want = flatten(params), flatten(expected)
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise UserError(
            f"The reference model's parameters do not match the config's model (missing {missing[:3]}, unexpected "
            f"{extra[:3]}). Fix: use the model's own config (its config.json) or drop --init_from."
        )
    for key, value in want.items():
        if tuple(got[key].shape) != tuple(value.shape):
            raise UserError(
                f"The reference model's {key} has shape {tuple(got[key].shape)}, the config's model "
                f"{tuple(value.shape)}. Fix: use the model's own config (its config.json) or drop --init_from."
            )


def transfer(params, init) -> tuple[dict, list[str]]:
    """(`init` with every leaf replaced by the one of `params` of the same name and shape, the names kept from
    `init`): how config.init_transfer starts a model with another text encoder from a reference model."""
    got, fresh = flatten(params), []
    merged = {}
    for key, value in flatten(init).items():
        if key in got and tuple(got[key].shape) == tuple(value.shape):
            merged[key] = np.asarray(got[key], value.dtype)
        else:
            merged[key] = value
            fresh.append(key)
    return unflatten(merged), fresh


def export(workdir, out_dir, step: int | None = None, readme: str | None = None) -> epath.Path:
    """Writes the EMA weights of checkpoint `step` (default the latest) of run `workdir` as a reference model into
    `out_dir`, which must be new or empty (an export never overwrites a model)."""
    from relcirc_jax.train import state as train_state

    out_dir, run_config = epath.Path(out_dir), epath.Path(workdir) / CONFIG_FILE
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(
            f"--out={out_dir} already exists and is not an empty directory; an export would overwrite what is there. "
            "Fix: pass a new or empty directory."
        )
    if not run_config.exists():
        raise UserError(
            f"--workdir={workdir} holds no training run (no {CONFIG_FILE}). Fix: pass the --workdir a training run "
            "wrote its checkpoints to."
        )
    config = saved_config(run_config)
    setup = train_state.build_run_setup(config, workdir)
    step, state = train_state.restore_or_fail(setup, workdir, step)
    config.unlock()
    config.pretrained_step = step
    # Where the run started from, and what taught it, is history (README.md keeps it), not part of the model: loading
    # the export must not load (part of) that older model again.
    config.init_from, config.init_transfer, config.train.teacher = None, False, None
    return save(state.ema_params, config, out_dir, readme)


def _main(argv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to export.", required=True)
    flags.DEFINE_string(
        "out",
        None,
        "New or empty directory to write model.safetensors, config.json (and README.md) into.",
        required=True,
    )
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("readme", None, "A markdown file to copy in as README.md.")
    try:
        flags.FLAGS(argv)
    except flags.Error as error:
        fail(f"{error}. Usage: python -m relcirc_jax.pretrained --workdir=RUN --out=NEW_DIR [--step=N] [--readme=FILE]")
    f = flags.FLAGS
    if f.readme and not os.path.isfile(f.readme):
        fail(f"--readme={f.readme} is not a file. Fix: pass the markdown file to copy in as README.md.")
    try:
        readme = epath.Path(f.readme).read_text() if f.readme else None
    except UnicodeDecodeError:
        fail(f"--readme={f.readme} is not UTF-8 text. Fix: pass the markdown file to copy in as README.md.")
    try:
        out = export(f.workdir, f.out, f.step, readme)
    except UserError as error:
        fail(str(error))
    size = os.path.getsize(out / WEIGHTS_FILE) / 2**20
    print(f"Wrote {out / WEIGHTS_FILE} ({size:.1f} MiB) and {out / CONFIG_FILE}.")


if __name__ == "__main__":
    _main(sys.argv)
