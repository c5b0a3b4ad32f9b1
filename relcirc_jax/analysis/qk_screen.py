"""QK screen: which cross-attention heads read spatial position against a relation word, from the weights alone.

For every layer, head and relation, the bilinear form q·k/sqrt(head_dim) of attn2 between the query of each image
token's fixed 2-D sin-cos position embedding and the key of the relation's caption-projected embedding (the mean over
the relation-phrase tokens of a canonical caption, in the conditioner's own tokens: groups.token_roles, so a cached
HF encoder's [CLS] and sub-word pieces count), as a [grid, grid] logit map. Each map is scored by its Pearson
correlation with the relation's reference gradient (object 1 relative to object 2, y downwards), and heads are ranked
by the mean |correlation| over relations. No sampling and no forward pass: every layer reads the fixed inputs below.

Assumption: cross-attention queries read the residual stream h directly (PixArt's attn2(h, context=caption)), and
the positional part of h is approximated by the input position embedding at every layer (no LayerNorm, no drift).

An MM-DiT's joint attention gets the same screen on its image-query -> caption-key block, each stream through the
block's own input path (JointTransformerBlock read at its attn.hook_q / hook_k): LayerNorm and adaLN modulation, then
to_q / add_k_proj and the QK RMSNorms, the logit averaged over the relation-phrase tokens. The modulation depends on
the timestep and the pooled caption: it is evaluated at `timestep` (run(): the eval sampler's first model timestep,
999 for every solver) with each canonical caption's own pooled text. Its extra assumption: the streams entering every
block are the position embedding and the caption after context_embedder (no update by earlier blocks).
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from relcirc_jax.analysis import groups
from relcirc_jax.analysis.context import annotate_cells, pyplot
from relcirc_jax.data import prompts
from relcirc_jax.data.spec import RELATIONS, SceneSpec
from relcirc_jax.diffusion import model_timesteps
from relcirc_jax.diffusion.schedules import NUM_TRAIN_TIMESTEPS
from relcirc_jax.models import arch, dit, mmdit

KIND = "qk_screen"
CANONICAL_OBJECTS = dict(shape1="circle", color1="red", shape2="square", color2="blue")
TOP_HEADS_FIGURE = 3
TOP_HEADS_TABLE = 5
DEFAULT_TIMESTEP = float(NUM_TRAIN_TIMESTEPS - 1)  # every solver's first model timestep (diffusion.model_timesteps)


def relation_captions() -> tuple[str, ...]:
    """One canonical caption per relation (RELATIONS order): "red circle is <phrase> blue square"."""
    return tuple(prompts.caption(SceneSpec(relation=r, **CANONICAL_OBJECTS), phrasing=0) for r in RELATIONS)


def reference_maps(grid: int) -> np.ndarray:
    """float32[R, grid, grid]: each relation's gradient of object 1 relative to object 2 (x = column, y = row, down)."""
    y, x = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    gradients = {
        "above": -y,
        "below": y,
        "left": -x,
        "right": x,
        "upper_left": -(x + y),
        "upper_right": x - y,
        "lower_left": y - x,
        "lower_right": x + y,
    }
    return np.stack([gradients[r] for r in RELATIONS]).astype(np.float32)


def _relation_tokens(conditioner) -> np.ndarray:
    """float32[R, L] indicators of the relation-phrase tokens of relation_captions() in the conditioner's tokens."""
    captions = relation_captions()
    is_relation = groups.token_roles(conditioner, captions) == groups.TEXT_ROLES.index("relation")
    missing = [c for c, found in zip(captions, is_relation.any(-1)) if not found]
    if missing:
        raise ValueError(f"The {conditioner.name!r} conditioner's tokens of {missing} have no relation-phrase token.")
    return is_relation.astype(np.float32)


def _dense(x, layer):
    return jnp.dot(x, layer["kernel"]) + layer["bias"]


def _stacked(params, layers: int, name: str, heads: int, head_dim: int):
    """Projection `name` of attn2 in every layer: kernel [L, D, H, dh], bias [L, H, dh]."""
    blocks = [params[f"transformer_blocks_{layer}"]["attn2"][name] for layer in range(layers)]
    kernel = jnp.stack([b["kernel"] for b in blocks]).astype(jnp.float32)
    bias = jnp.stack([b["bias"] for b in blocks]).astype(jnp.float32)
    return kernel.reshape(kernel.shape[:2] + (heads, head_dim)), bias.reshape(layers, heads, head_dim)


def _pearson(maps, references):
    """Correlation over the last axis; 0 where either side is constant."""
    a = maps - maps.mean(-1, keepdims=True)
    b = references - references.mean(-1, keepdims=True)
    denominator = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
    return jnp.where(denominator > 0, jnp.sum(a * b, -1) / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def _pixart_qk(params, cfg, text, positions):
    """attn2's q of the position embedding [L, R, N, H, dh] (the same for every caption) and k of the
    caption-projected text [L, R, T, H, dh]."""
    projection = params["caption_projection"]
    caption = _dense(jax.nn.gelu(_dense(text, projection["linear_1"]), approximate=True), projection["linear_2"])
    w_q, b_q = _stacked(params, cfg.depth, "to_q", cfg.num_heads, cfg.head_dim)
    w_k, b_k = _stacked(params, cfg.depth, "to_k", cfg.num_heads, cfg.head_dim)
    q = jnp.einsum("nd,ldhe->lnhe", positions, w_q) + b_q[:, None]
    k = jnp.einsum("rtd,ldhe->lrthe", caption, w_k) + b_k[:, None, None]
    return jnp.broadcast_to(q[:, None], k.shape[:2] + q.shape[1:]), k


def _joint_qk(params, cfg, text, text_mask, positions, timestep):
    """The joint attention's image q of the position embedding [L, R, N, H, dh] and text k of the caption after
    context_embedder [L, R, T, H, dh], both through every block's own input path at `timestep`, in float32."""
    cfg = dataclasses.replace(cfg, dtype="float32")
    rows, text_len = text.shape[:2]
    temb = mmdit.CombinedTimestepTextProjEmbeddings(cfg.hidden_size, jnp.float32).apply(
        {"params": params["time_text_embed"]}, jnp.full((rows,), timestep), mmdit.masked_mean(text, text_mask)
    )
    image = jnp.broadcast_to(positions, (rows,) + positions.shape)
    caption = _dense(text, params["context_embedder"])
    q, k = [], []
    for layer in range(cfg.depth):
        hooks = (f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k")
        block = mmdit.JointTransformerBlock(cfg, layer, layer == cfg.depth - 1, hooks)
        _, state = block.apply(
            {"params": params[f"transformer_blocks_{layer}"]}, image, caption, temb, text_mask, mutable="intermediates"
        )
        sown = dit.collect_sown(state["intermediates"])
        q.append(sown[hooks[0]][:, text_len:])  # joint order: text first, then image
        k.append(sown[hooks[1]][:, :text_len])
    return jnp.stack(q), jnp.stack(k)


@functools.lru_cache(maxsize=8)
def _screen_fn(model_cfg: arch.ModelConfig, embed):
    """jit(f(params, tables, is_relation [R, T], timestep) -> (logits [L, H, R, g, g], correlation [L, H, R])) for
    one model shape and encoder."""
    from relcirc_jax.train.sampling import caption_batch

    cfg, joint = model_cfg, arch.arch_of(model_cfg) == "mmdit"
    grid = cfg.grid_size
    positions = dit.sincos_2d_position_embedding(cfg.hidden_size, grid, cfg.pos_interpolation_scale)  # [N, D]
    references = reference_maps(grid).reshape(len(RELATIONS), grid * grid)  # [R, N]
    batch = caption_batch(relation_captions())

    def screen_arrays(params, tables, is_relation, timestep):
        params = params["params"] if set(params) == {"params"} else params
        text, text_mask = embed(tables, {k: jnp.asarray(v) for k, v in batch.items()})  # [R, T, Dc]
        text = text.astype(jnp.float32)
        if joint:
            q, k = _joint_qk(params, cfg, text, text_mask, positions, timestep)
        else:
            q, k = _pixart_qk(params, cfg, text, positions)
        weights = is_relation / is_relation.sum(-1, keepdims=True)  # [R, T]
        # the logit of the relation phrase: the mean over its tokens (a linear map's key of the mean, for PixArt)
        logits = jnp.einsum("lrnhe,lrthe,rt->lhrn", q, k, weights) * cfg.head_dim**-0.5
        correlation = _pearson(logits, references)  # [L, H, R]
        return logits.reshape(logits.shape[:-1] + (grid, grid)), correlation

    return jax.jit(screen_arrays)


def screen(
    params, model_cfg: arch.ModelConfig, conditioner, tables, timestep: float = DEFAULT_TIMESTEP
) -> dict[str, np.ndarray]:
    """The QK screen of a DiT's cross-attention (an MM-DiT's joint attention, image queries on caption keys, its
    modulation at model timestep `timestep`): "logits" [L, H, R, grid, grid], "correlation" [L, H, R] (with
    reference_maps), "head_score" [L, H] = mean_R |correlation|, "signed_score" [L, H] = mean_R correlation, and
    "ranking" int[L*H, 2] (layer, head) by head_score, best first."""
    is_relation = jnp.asarray(_relation_tokens(conditioner))
    with jax.default_matmul_precision("highest"):
        screen_arrays = _screen_fn(model_cfg, conditioner.embed)
        logits, correlation = jax.block_until_ready(screen_arrays(params, tables, is_relation, jnp.float32(timestep)))
    correlation = np.asarray(correlation)
    head_score = np.abs(correlation).mean(-1)
    order = np.argsort(-head_score.reshape(-1), kind="stable")
    ranking = np.stack(np.unravel_index(order, head_score.shape), axis=1).astype(np.int32)
    return {
        "logits": np.asarray(logits),
        "correlation": correlation,
        "head_score": head_score,
        "signed_score": correlation.mean(-1),
        "ranking": ranking,
    }


def _best_relation(correlation: np.ndarray) -> str:
    r = int(np.argmax(np.abs(correlation)))
    return f"{RELATIONS[r]} ({correlation[r]:+.3f})"


def summary_markdown(result: dict[str, np.ndarray], label: str, seconds: float, timestep: float | None = None) -> str:
    """The report's markdown; `timestep`: an MM-DiT's modulation timestep (None for a PixArt DiT)."""
    if timestep is None:
        heads = "cross-attention (attn2) head"
        projections = (
            "q = position embedding @ W_Q + b_Q over the image grid and k = the caption-projected embedding of each "
            "relation word @ W_K + b_K"
        )
        assumption = "the positional part of the residual stream is the input position embedding at every layer"
    else:
        heads = "joint-attention (attn) head"
        projections = (
            "q from the position embedding over the image grid and k from each relation word's caption after "
            "context_embedder, both through the block's own input path: LayerNorm, adaLN modulation at model "
            f"timestep t = {timestep:g} (the eval sampler's first step) with the caption's pooled text, to_q / "
            "add_k_proj, QK RMSNorms"
        )
        assumption = (
            "the streams entering every block are the position embedding and the caption after context_embedder"
        )
    lines = [
        f"# QK screen: {label}",
        "",
        f"Weight-space screen of every {heads}, no sampling: logit map q·k/sqrt(head_dim) with {projections} (the "
        f"logit's mean over the relation-phrase tokens of '{relation_captions()[0]}' and its 7 siblings). Each map's "
        "Pearson correlation with the relation's reference gradient (above -y, below +y, left -x, right +x, "
        "diagonals their sums; y downwards); head score = mean |correlation| over the 8 relations, signed score = "
        "mean correlation.",
        "",
        f"Assumes {assumption}.",
        "",
        f"## Top {TOP_HEADS_TABLE} heads",
        "",
        "| rank | layer | head | score | signed score | best relation (correlation) |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for rank, (layer, head) in enumerate(result["ranking"][:TOP_HEADS_TABLE]):
        lines.append(
            f"| {rank + 1} | {layer} | {head} | {result['head_score'][layer, head]:.3f} | "
            f"{result['signed_score'][layer, head]:+.3f} | {_best_relation(result['correlation'][layer, head])} |"
        )
    lines += ["", f"screen() wall time after compilation: {seconds * 1e3:.2f} ms.", ""]
    return "\n".join(lines)


def head_score_figure(result: dict[str, np.ndarray], label: str):
    plt = pyplot()
    scores = result["head_score"]
    layers, heads = scores.shape
    figure, axis = plt.subplots(figsize=(1.0 + 0.7 * heads, 1.0 + 0.45 * layers))
    image = axis.imshow(scores, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    annotate_cells(axis, image, scores)
    axis.set_xticks(range(heads))
    axis.set_yticks(range(layers))
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title(f"QK screen head score (mean |r|): {label}", fontsize=9)
    figure.colorbar(image, ax=axis)
    return figure


def logit_map_figure(result: dict[str, np.ndarray], label: str, top: int = TOP_HEADS_FIGURE):
    plt = pyplot()
    rows = result["ranking"][:top]
    figure, axes = plt.subplots(
        len(rows), len(RELATIONS), figsize=(1.6 * len(RELATIONS), 1.8 * len(rows)), squeeze=False
    )
    for row, (layer, head) in enumerate(rows):
        for column, relation in enumerate(RELATIONS):
            axis = axes[row, column]
            axis.imshow(result["logits"][layer, head, column], cmap="coolwarm")
            axis.set_title(f"{relation}\nr={result['correlation'][layer, head, column]:+.2f}", fontsize=7)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(f"L{layer} H{head}", fontsize=8)
    figure.suptitle(f"QK logit maps of the top {len(rows)} heads: {label}", fontsize=9)
    return figure


def run(model, out_dir) -> epath.Path:
    """Screens `model` (an analysis.context.AnalysisModel) and writes <out_dir>/qk_screen/: qk_screen.npz,
    head_scores.png, logit_maps.png, summary.md. Returns the directory."""
    from relcirc_jax.analysis import context

    timestep = float(model_timesteps(model.config.eval.solver, model.config.eval.num_steps)[0])
    arguments = (model.params, model.model_cfg, model.conditioner, model.tables, timestep)
    result = screen(*arguments)  # compiles
    start = time.perf_counter()
    screen(*arguments)
    seconds = time.perf_counter() - start

    joint = arch.arch_of(model.model_cfg) == "mmdit"
    arrays = dict(
        result,
        reference=reference_maps(model.model_cfg.grid_size),
        relations=np.array(RELATIONS),
        captions=np.array(relation_captions()),
    )
    if joint:
        arrays["timestep"] = np.float32(timestep)
    figures = {
        "head_scores": head_score_figure(result, model.label),
        "logit_maps": logit_map_figure(result, model.label),
    }
    summary = summary_markdown(result, model.label, seconds, timestep if joint else None)
    return context.write_report(out_dir, KIND, arrays, figures, summary)
