"""One compiled sampler over many interventions: jit(vmap(generate)) over chunks of DiT intervention arrays.

Head ablation (head masks) and activation patching (patch weights and windows) are data for the DiT (models/dit.py,
models/mmdit.py), so a screen of M interventions samples the same captions from the same noises under each of them,
`chunk` interventions per call of one compiled function, with the batch sharded over the mesh like training.
"""

import math
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from relcirc_jax.analysis import context, groups
from relcirc_jax.models import arch
from relcirc_jax.parallel import axes, host_data
from relcirc_jax.parallel import rules as sharding_rules
from relcirc_jax.train import sampling

# The kinds of attention head per model family, and the prefix of each kind's keyword arguments (`<prefix>_mask`,
# `_mean_mask`, `_patch`): an MM-DiT's joint-attention heads take its "self" keywords.
HEAD_KINDS = {"pixart": ("self", "cross"), "mmdit": ("joint",)}
_KEYWORD_PREFIX = {"self": "self_head", "cross": "cross_head", "joint": "self_head"}


def head_kinds(model_cfg: arch.ModelConfig) -> tuple[str, ...]:
    """The kinds of attention head of a model: ("self", "cross") for a PixArt DiT, ("joint",) for an MM-DiT."""
    return HEAD_KINDS[arch.arch_of(model_cfg)]


def head_keyword(kind: str, intervention: str) -> str:
    """The model keyword of `intervention` ("mask", "mean_mask" or "patch") on heads of `kind`."""
    return f"{_KEYWORD_PREFIX[kind]}_{intervention}"


def screen(
    model: context.AnalysisModel,
    captions: Sequence[str],
    interventions: dict[str, np.ndarray],
    *,
    chunk: int = 8,
    noise_id: np.ndarray | None = None,
    patch_source: np.ndarray | None = None,
    label: str = "screen",
    generate_kwargs: dict | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """(uint8 images [M, len(captions), H, W, 3], {"compile_s", "run_s"}): the captions sampled under each of the M
    interventions ({DiT keyword: array [M, ...]}) with the model config's eval sampler (solver, steps, CFG, seed,
    negative).

    Image i starts from the noise of noise_id[i] (default i); patch_source[i] (default none) is the row image i
    patches from. `generate_kwargs` go to sampling.generate_fn (e.g. a repulsion config); the batch carries the
    captions' token roles (analysis.groups.token_roles) for a repulsion's token mask by role.
    Captions are padded to a multiple of the batch shards (the padding rows patch from themselves and enter no mean
    ablation's mean). The result does not depend on the mesh, but another `chunk` changes the batched matmuls' shapes
    and so their float rounding (the odd pixel one level off).
    """
    captions = list(captions)
    if not captions:
        raise ValueError("No captions to sample.")
    sizes = {name: len(value) for name, value in interventions.items()}
    if not sizes or len(set(sizes.values())) != 1 or not min(sizes.values()):
        raise ValueError(f"Interventions need one leading axis of the same size M >= 1 in every array; got {sizes}.")
    num = next(iter(sizes.values()))
    n, mesh = len(captions), model.mesh
    padded = math.ceil(n / sharding_rules.batch_shards(mesh)) * sharding_rules.batch_shards(mesh)
    padded_captions = captions + [captions[-1]] * (padded - n)
    batch = {**sampling.caption_batch(padded_captions), "roles": groups.token_roles(model.conditioner, padded_captions)}
    batch["noise_id"] = np.arange(padded, dtype=np.int32)
    batch["mean_group"] = np.where(np.arange(padded) < n, 0, -1).astype(np.int32)
    if noise_id is not None:
        batch["noise_id"][:n] = noise_id
    if patch_source is not None:
        batch["patch_source"] = np.arange(padded, dtype=np.int32)
        batch["patch_source"][:n] = patch_source
    batch = host_data.shared_to_global(batch, mesh)
    noises = batch.pop("noise_id")

    settings = {**sampling.eval_settings(model.config), **(generate_kwargs or {})}
    generate = sampling.generate_fn(model.model_cfg, model.conditioner, settings_axis=axes.SETTINGS, **settings)
    batch_sh, replicated = sharding_rules.batch_sharding(mesh), sharding_rules.replicated(mesh)
    screen_fn = jax.jit(
        jax.vmap(generate, in_axes=(None, None, None, None, 0), axis_name=axes.SETTINGS),
        in_shardings=(model.param_sh, batch_sh, replicated, batch_sh, replicated),
        out_shardings=NamedSharding(mesh, P(None, sharding_rules.BATCH_AXES)),
    )
    chunk = max(1, min(chunk, num))
    num_chunks = math.ceil(num / chunk)
    fill = num_chunks * chunk - num  # the last chunk is filled with copies of row 0 (their images are dropped)
    arrays = {k: np.asarray(v) for k, v in interventions.items()}
    arrays = {k: np.concatenate([v, np.repeat(v[:1], fill, 0)]) for k, v in arrays.items()}

    def chunk_arrays(i):
        return jax.device_put({k: v[i * chunk : (i + 1) * chunk] for k, v in arrays.items()}, replicated)

    start = time.perf_counter()
    compiled = screen_fn.lower(model.params, batch, model.tables, noises, chunk_arrays(0)).compile()
    compile_s = time.perf_counter() - start
    logging.info(
        "%s: %d interventions x %d images in %d chunks of %d; compiled in %.1f s.",
        label, num, n, num_chunks, chunk, compile_s,
    )  # fmt: skip
    images = []
    start = time.perf_counter()
    for i in range(num_chunks):
        out = host_data.to_host(compiled(model.params, batch, model.tables, noises, chunk_arrays(i)))
        images.append(out[:, :n])
        elapsed = time.perf_counter() - start
        logging.info(
            "%s: chunk %d/%d done, %.1f s elapsed, ETA %.1f s.",
            label, i + 1, num_chunks, elapsed, elapsed / (i + 1) * (num_chunks - i - 1),
        )  # fmt: skip
    run_s = time.perf_counter() - start
    return np.concatenate(images)[:num], {"compile_s": compile_s, "run_s": run_s}
