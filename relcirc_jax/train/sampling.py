"""Prompts -> images: one jitted, batch-sharded call (text embedding, CFG, DPM-Solver++), plus image grids."""

import dataclasses
import functools
import hashlib
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from relcirc_jax import diffusion
from relcirc_jax.analysis import baselines
from relcirc_jax.analysis import repulsion as repulsion_lib
from relcirc_jax.config import NEGATIVES
from relcirc_jax.data import dataset, tokenizer
from relcirc_jax.data import prompts as prompt_grammar
from relcirc_jax.diffusion import guidance
from relcirc_jax.errors import UserError
from relcirc_jax.models import arch, dit
from relcirc_jax.parallel import rules as sharding_rules
from relcirc_jax.parallel.host_data import shared_to_global, to_host
from relcirc_jax.train import state as train_state

# Samples of one prompt per repulsion / particle-guidance group (generate_fn's default).
GROUP_SIZE = 4


class Sampler:
    """Generates uint8 images for captions in fixed-size, batch-sharded chunks (one compiled function per run).

    The starting noise of the i-th caption is a function of (seed, i) alone, so the same captions give the same images
    whatever the chunk size or the mesh. Every process passes the same captions; inputs are spread over the mesh's
    devices (also across processes) and every process gets all images back.

    With `capture` and `reduce` (see generate_fn; reduce's leaves must keep the batch axis first) a call returns
    (images, captured) with the captured leaves [num_steps, len(captions), ...]; `extra_fields(captions)` adds
    per-caption arrays to the batch that reduce reads (e.g. token roles). `generate_kwargs` go to generate_fn (e.g.
    a repulsion and its group size) and `interventions` (one setting, e.g. the repulsion's knobs) to every call.
    With a repulsion, batch_size must split into its groups and each group of captions must name one prompt
    (ValueError naming the fix otherwise).
    """

    def __init__(
        self,
        model_cfg: arch.ModelConfig,
        conditioner,
        mesh: jax.sharding.Mesh,
        param_sh,
        *,
        cfg_scale: float,
        num_steps: int,
        solver: str,
        batch_size: int,
        seed: int,
        negative: str = "empty_prompt",
        capture: Sequence[str] = (),
        reduce: Callable | None = None,
        extra_fields: Callable[[Sequence[str]], dict] | None = None,
        generate_kwargs: dict | None = None,
        interventions: dict | None = None,
    ):
        shards = sharding_rules.batch_shards(mesh)
        self.batch_size = math.ceil(batch_size / shards) * shards
        kwargs = generate_kwargs or {}
        self._group_size = kwargs.get("group_size", GROUP_SIZE) if kwargs.get("repulsion") is not None else None
        if self._group_size and self.batch_size % self._group_size:
            raise ValueError(
                f"Sampler(batch_size={batch_size}) samples chunks of {self.batch_size} rows (a multiple of the mesh's "
                f"{shards} batch shards), which do not split into repulsion groups of {self._group_size}: a group "
                "would straddle two prompts and the CFG halves. Fix: make batch_size a multiple of "
                f"{math.lcm(self._group_size, shards)} (the group size and the batch shards)."
            )
        self._mesh = mesh
        self._extra_fields = extra_fields
        self._capturing = reduce is not None
        batch_sh, replicated = sharding_rules.batch_sharding(mesh), sharding_rules.replicated(mesh)
        self._interventions = () if interventions is None else (jax.device_put(interventions, replicated),)
        self._generate = jax.jit(
            generate_fn(
                model_cfg,
                conditioner,
                cfg_scale=cfg_scale,
                num_steps=num_steps,
                solver=solver,
                seed=seed,
                negative=negative,
                capture=capture,
                reduce=reduce,
                **(generate_kwargs or {}),
            ),
            in_shardings=(param_sh, batch_sh, replicated, batch_sh) + (replicated,) * len(self._interventions),
            out_shardings=None if self._capturing else batch_sh,
        )

    def __call__(self, params, tables, captions: Sequence[str]):
        """uint8[len(captions), H, W, 3] images for `captions` (and the captured values, when capturing)."""
        captions = list(captions)
        padded = captions + [captions[-1]] * (-len(captions) % self.batch_size)
        if self._group_size:
            repulsion_lib.check_caption_groups(padded, self._group_size)
        batch = caption_batch(padded)
        if self._extra_fields is not None:
            batch.update(self._extra_fields(padded))
        batch["noise_id"] = np.arange(len(padded), dtype=np.int32)
        images, captured = [], []
        for start in range(0, len(padded), self.batch_size):
            chunk = shared_to_global({k: v[start : start + self.batch_size] for k, v in batch.items()}, self._mesh)
            noise_id = chunk.pop("noise_id")
            out = self._generate(params, chunk, tables, noise_id, *self._interventions)
            if self._capturing:
                out, aux = out
                captured.append(jax.tree.map(to_host, aux))
            images.append(to_host(out))
        images = np.concatenate(images)[: len(captions)]
        if not self._capturing:
            return images
        return images, jax.tree.map(lambda *xs: np.concatenate(xs, axis=1)[:, : len(captions)], *captured)


def caption_batch(captions: Sequence[str]) -> dict[str, np.ndarray]:
    """The text fields a TextConditioner reads ("ids", "mask", "caption_index") for `captions`."""
    ids, mask = tokenizer.encode(captions)
    caption_index = np.array([prompt_grammar.caption_index(c) for c in captions], np.int32)
    return {"ids": ids, "mask": mask, "caption_index": caption_index}


def negative_caption(negative: str, conditioner, params, tables, batch: int) -> tuple[jax.Array, jax.Array]:
    """The CFG negative ([B, L, D] text, [B, L] mask): the encoder's embedding of the empty caption ("empty_prompt",
    the paper's choice) or the DiT's learned null caption ("learned_null", what caption dropout trains)."""
    if negative == "learned_null":
        return dit.null_caption(params, batch)
    if negative != "empty_prompt":
        raise ValueError(f"Unknown CFG negative {negative!r}; use one of {NEGATIVES}.")
    text, mask = conditioner.embed(tables, {k: jnp.asarray(v) for k, v in caption_batch([""]).items()})
    return jnp.broadcast_to(text, (batch,) + text.shape[1:]), jnp.broadcast_to(mask, (batch,) + mask.shape[1:])


def generate_fn(
    model_cfg: arch.ModelConfig,
    conditioner,
    *,
    cfg_scale: float,
    num_steps: int,
    solver: str,
    seed: int,
    negative: str,
    capture: Sequence[str] = (),
    reduce: Callable | None = None,
    repulsion=None,
    group_size: int = GROUP_SIZE,
    settings_axis: str | None = None,
) -> Callable:
    """generate(params, batch, tables, noise_id, interventions=None) -> uint8 images [B, H, W, 3]: text embedding, CFG
    and the solver in one traceable function (jit it; vmap it over `interventions` for ablation and patching screens).

    interventions: None or the model's keyword arguments (head masks, patch weights and window), e.g.
    {"self_head_mask": [depth, heads], "cross_head_mask": [depth, heads]}. A batch field "patch_source" [B] (int)
    names the row each row patches from; generate extends it to the CFG batch (the unconditional half of a row reads
    the unconditional half of its source). A mean ablation averages each CFG half apart, over the rows whose batch
    field "mean_group" [B] (int, default 0) is 0; a row marked -1 (padding) enters no mean.
    With `reduce`, the model records the capture points named in `capture` (arch.hook_names) at every solver step,
    `reduce(cache, batch)` turns the conditional half's {name: [B, ...]} into a pytree inside the scan, and generate
    returns (images, that pytree stacked over steps [num_steps, ...]).
    With `repulsion` (an analysis.repulsion.RepulsionConfig), `interventions` must hold its traced knobs
    (repulsion.KNOBS: eta, timestep window, blocks), and each group of `group_size` consecutive captions is repelled
    (this group size replaces the config's, and must divide the batch: ValueError otherwise, since a group would
    straddle prompts and the CFG halves; sweeping the knobs does not recompile); a token mask by role reads the
    batch field "roles" [B, L] (analysis.groups.token_roles). The diversity baselines
    (analysis/baselines.py: a traced CFG scale, interval guidance, particle guidance over groups of `group_size`
    captions, CADS) act when their knob is among the interventions. `settings_axis`: the name of the vmap over
    `interventions` when there is one (see parallel/axes.SETTINGS), so that the repulsion skips its work when no
    setting needs it.
    """
    if repulsion is not None:
        repulsion = dataclasses.replace(repulsion, settings_axis=settings_axis, group_size=group_size)
    # No backward pass here, so no rematerialisation (it would also not pass a repulsion through the blocks).
    model = arch.module(dataclasses.replace(model_cfg, remat=False), capture)
    image_shape = (model_cfg.image_size, model_cfg.image_size, model_cfg.in_channels)
    has_aux = reduce is not None

    def generate(params, batch, tables, noise_id, interventions=None):
        text, text_mask = conditioner.embed(tables, batch)
        null_text, null_mask = negative_caption(negative, conditioner, params, tables, text.shape[0])
        masks = dict(interventions or {})
        knobs = {name: masks.pop(name) for name in baselines.KNOBS if name in masks}
        if repulsion is not None:
            eta, window, blocks = (masks.pop(name) for name in repulsion_lib.KNOBS)
            rows = repulsion_lib.rows_on(repulsion, text.shape[0])
            roles = repulsion_lib.cfg_roles(repulsion, batch.get("roles"))
            masks["repulsion"] = repulsion_lib.Repulsion(repulsion, eta, window, blocks, rows, roles)
        if "patch_source" in batch:
            masks["patch_source"] = jnp.concatenate([batch["patch_source"], batch["patch_source"] + text.shape[0]])
        if any(name.endswith("_mean_mask") for name in masks):  # the CFG halves are mean-ablated apart
            group = batch.get("mean_group", jnp.zeros(text.shape[0], jnp.int32))
            masks["mean_group"] = jnp.concatenate([group, jnp.where(group < 0, group, 1)])

        def model_fn(x, t, txt, msk):
            if "cads" in knobs:  # the conditional half only
                half = text.shape[0]
                keys = baselines.cads_keys(seed, noise_id)
                cond = baselines.cads_condition(txt[:half], t[:half], keys, knobs["cads"])
                txt = jnp.concatenate([cond, txt[half:]])
            if not has_aux:
                return model.apply({"params": params}, x, t, txt, msk, **masks)
            out, state = model.apply({"params": params}, x, t, txt, msk, mutable=["intermediates"], **masks)
            cache = dit.collect_sown(state["intermediates"])
            return out, reduce({name: value[: text.shape[0]] for name, value in cache.items()}, batch)

        scale = cfg_scale
        if "cfg_scale" in knobs or "guidance_window" in knobs:
            scale = functools.partial(
                baselines.guidance_scale, knobs.get("cfg_scale", cfg_scale), window=knobs.get("guidance_window")
            )
        guided = guidance.cfg_denoiser_fn(
            model_fn, text, text_mask, null_text.astype(text.dtype), null_mask, scale, has_aux=has_aux
        )
        eps_fn = diffusion.eps_fn_from(guided, model_cfg.prediction, has_aux=has_aux)
        if "pg_coeff" in knobs:
            eps_fn = _with_particle_guidance(eps_fn, knobs["pg_coeff"], group_size, has_aux)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(noise_id)
        noise = jax.vmap(lambda key: jax.random.normal(key, image_shape))(keys)
        if not has_aux:
            return to_uint8(diffusion.sample(eps_fn, noise, solver=solver, num_steps=num_steps))
        x0, _, aux = diffusion.sample_with_aux(eps_fn, noise, solver=solver, num_steps=num_steps)
        return to_uint8(x0), aux

    return generate


def _with_particle_guidance(eps_fn: Callable, coeff, group_size: int, has_aux: bool) -> Callable:
    def guided(x, t):
        out = eps_fn(x, t)
        eps, aux = out if has_aux else (out, None)
        eps = baselines.particle_guidance(eps, x, jnp.broadcast_to(t, x.shape[:1]), coeff, group_size)
        return (eps, aux) if has_aux else eps

    return guided


def to_uint8(images: jax.Array) -> jax.Array:
    """Model space [-1, 1] -> uint8 [0, 255]."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def image_grid(images: np.ndarray, *, pad: int = 2) -> np.ndarray:
    """uint8[N,H,W,C] -> one uint8 image of a near-square grid, white padding between tiles."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    return grid


def make_sampler(setup: train_state.RunSetup, batch_size: int) -> Sampler:
    """A sampler with the eval settings (DPM-Solver++ 14 steps, CFG 4.5 by default) over the EMA params' shardings."""
    return eval_sampler(
        setup.config,
        setup.model_cfg,
        setup.conditioner,
        setup.mesh,
        setup.state_shardings.ema_params,
        batch_size,
    )


def eval_settings(config: ml_collections.ConfigDict) -> dict:
    """The sampler settings of evaluation: config.eval's CFG scale, steps, solver and seed, config.sample's negative
    (keyword arguments of generate_fn and Sampler)."""
    eval_config = config.eval
    return dict(
        cfg_scale=eval_config.cfg_scale,
        num_steps=eval_config.num_steps,
        solver=eval_config.solver,
        seed=eval_config.seed,
        negative=config.sample.negative,
    )


def describe_eval_sampler(config: ml_collections.ConfigDict) -> str:
    """eval_settings as the analysis reports state them, e.g. "dpmpp_2m 14 steps, CFG 4.5 against empty_prompt,
    seed 1234"."""
    s = eval_settings(config)
    return f"{s['solver']} {s['num_steps']} steps, CFG {s['cfg_scale']} against {s['negative']}, seed {s['seed']}"


def eval_sampler(config, model_cfg, conditioner, mesh, param_sh, batch_size: int, **options) -> Sampler:
    """A Sampler with the eval settings (eval_settings); `options` are Sampler's capture, reduce, extra_fields,
    generate_kwargs and interventions."""
    return Sampler(model_cfg, conditioner, mesh, param_sh, batch_size=batch_size, **eval_settings(config), **options)


def fixed_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """sample.num_prompts captions spread evenly over the eval prompt set (the training-time sample grid)."""
    captions = dataset.eval_prompts(config.eval.prompt_set)
    picks = np.linspace(0, len(captions) - 1, min(config.sample.num_prompts, len(captions))).round().astype(int)
    return [captions[i] for i in picks]


def run_sample(
    config: ml_collections.ConfigDict, workdir, captions: Sequence[str] | None = None, step: int | None = None
) -> epath.Path:
    """Samples `captions` (default: the fixed prompts) from checkpoint `step` (default the latest) of `workdir` with
    EMA weights.

    Writes samples/sample_{step}.png (a grid) and samples/sample_{step}.npz (images uint8, captions); given captions
    go to sample_{step}_{digest of the captions} instead, so sampling other prompts never replaces an earlier output
    (the same prompts give the same images again). Returns the .npz path.
    """
    suffix = "_" + hashlib.sha1("\n".join(captions).encode()).hexdigest()[:8] if captions else ""
    captions = list(captions) if captions else fixed_prompts(config)
    try:
        caption_batch(captions)
    except ValueError as error:
        raise UserError(f"--prompt: {error}") from error
    train_state.require_weights(config, workdir, step)  # before anything slow, and creating nothing
    setup = train_state.build_run_setup(config, workdir)
    step, ema_params = train_state.ema_weights(setup, workdir, step)
    images = make_sampler(setup, len(captions))(ema_params, setup.tables, captions)
    out = epath.Path(workdir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sample_{step:08d}{suffix}"
    with path.with_suffix(".png").open("wb") as f:
        Image.fromarray(image_grid(images)).save(f, format="PNG")
    with path.with_suffix(".npz").open("wb") as f:
        np.savez(f, images=images, captions=np.array(captions))
    logging.info("Wrote %d samples of step %d: the grid %s.png, the arrays .npz.", len(captions), step, path)
    setup.checkpointer.close()
    return path.with_suffix(".npz")
