"""Attention synopsis: how much attention each image-token group (object 1, object 2, background) pays to each caption
role (cross-attention) and to each image group (self-attention), per solver step, layer and head, averaged over
prompts and seeds; and the heads it ranks as relation heads (object tokens -> relation words) and object heads
(object tokens -> their own shape word).

Two sampling passes with the same noises: a plain one whose images give the image-token groups (groups.py), then one
capture pass that reduces every attention pattern inside the solver's scan to per-example sums [B, layers, heads,
group, role] and [B, layers, heads, group, group]; the full patterns never leave the step.

Both model families: a PixArt DiT's "cross" is its cross-attention pattern [B, H, N, L] and "self" its self-attention
[B, H, N, N]; an MM-DiT has one joint pattern [B, H, Lt + N, Lt + N] per block (text first, models/mmdit.py), whose
image-query rows give "cross" (keys < Lt) and "self" (keys >= Lt). There one softmax spans text and image keys, so a
head's mass on the caption is a share of all its attention, not a distribution over the caption.
"""

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from relcirc_jax.analysis import capture, groups
from relcirc_jax.analysis.context import AnalysisModel, annotate_cells, pyplot, write_report
from relcirc_jax.diffusion import model_timesteps
from relcirc_jax.models import arch
from relcirc_jax.train import evaluate

ROLE = {name: i for i, name in enumerate(groups.TEXT_ROLES)}
OBJECTS = (0, 1)  # object 1, object 2 in IMAGE_GROUPS


def attention_names(model_cfg: arch.ModelConfig) -> list[str]:
    """The attention patterns the synopsis reads: self- and cross-attention of every PixArt block, the joint
    attention of every MM-DiT block."""
    kinds = ("attn",) if arch.arch_of(model_cfg) == "mmdit" else ("attn", "cross_attn")
    return [f"blocks.{layer}.{kind}.hook_pattern" for layer in range(model_cfg.depth) for kind in kinds]


def _image_rows(cache: dict, layer: int, num_image_tokens: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(image -> caption [B, H, N, L], image -> image [B, H, N, N]) attention of block `layer`, from its cross- and
    self-attention patterns (PixArt) or split out of its joint pattern (MM-DiT, text keys first)."""
    cross = cache.get(f"blocks.{layer}.cross_attn.hook_pattern")
    if cross is not None:
        return cross, cache[f"blocks.{layer}.attn.hook_pattern"]
    joint = cache[f"blocks.{layer}.attn.hook_pattern"]
    text_len = joint.shape[-1] - num_image_tokens
    return joint[:, :, text_len:, :text_len], joint[:, :, text_len:, text_len:]


def reduce_attention(cache: dict, batch: dict) -> dict:
    """Per-example attention mass: cross [B, layers, heads, image group, text role] and self [B, layers, heads,
    image group, image group], each summed over the group's (weighted) query tokens."""
    depth = len([name for name in cache if name.endswith(".attn.hook_pattern")])
    roles = jax.nn.one_hot(batch["roles"], len(groups.TEXT_ROLES), dtype=jnp.float32)  # [B, L, R]
    weights = batch["groups"]  # [B, N, G]
    patterns = [_image_rows(cache, layer, weights.shape[1]) for layer in range(depth)]
    cross = [jnp.einsum("bhnl,bng,blr->bhgr", c, weights, roles) for c, _ in patterns]
    self_attention = [jnp.einsum("bhnm,bng,bmf->bhgf", s, weights, weights) for _, s in patterns]
    return {"cross": jnp.stack(cross, 1), "self": jnp.stack(self_attention, 1)}


def synopsis(
    model: AnalysisModel, captions: Sequence[str], token_groups: np.ndarray, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """The synopsis arrays (`summarize`, plus timesteps [steps]) for `captions` given their image-token groups
    [B, N, 3] (image_token_groups of the images the same captions and noises give)."""
    captions = list(captions)
    roles = groups.token_roles(model.conditioner, captions)
    token_groups = np.asarray(token_groups, np.float32)

    def extra_fields(padded):
        pad = len(padded) - len(captions)
        return {
            "roles": np.concatenate([roles, roles[-1:].repeat(pad, 0)]),
            "groups": np.concatenate([token_groups, token_groups[-1:].repeat(pad, 0)]),
        }

    sampler = capture.sampler(
        model,
        batch_size or len(captions),
        attention_names(model.model_cfg),
        reduce_attention,
        extra_fields,
    )
    _, sums = sampler(model.params, model.tables, captions)
    eval_config = model.config.eval
    return {**summarize(sums, token_groups), "timesteps": model_timesteps(eval_config.solver, eval_config.num_steps)}


def summarize(sums: dict, token_groups: np.ndarray) -> dict[str, np.ndarray]:
    """From a capture pass' per-example sums (reduce_attention, stacked over steps) and the token groups [B, N, G]:
    cross [steps, layers, heads, G, roles] and self [steps, layers, heads, G, G] (mean attention of a group's
    tokens), role_mass [layers, heads, roles] (object tokens -> each role, objects and steps averaged),
    relation_score and object_score [layers, heads], group_tokens [G]."""
    per_group = np.maximum(np.asarray(token_groups).sum((0, 1)), 1e-9)  # [G]
    cross = sums["cross"].sum(1) / per_group[None, None, None, :, None]
    self_attention = sums["self"].sum(1) / per_group[None, None, None, :, None]
    role_mass = cross[:, :, :, list(OBJECTS)].mean((0, 3))
    object_score = (cross[:, :, :, 0, ROLE["shape1"]] + cross[:, :, :, 1, ROLE["shape2"]]).mean(0) / 2
    return {
        "cross": cross,
        "self": self_attention,
        "role_mass": role_mass,
        "relation_score": role_mass[..., ROLE["relation"]],
        "object_score": object_score,
        "group_tokens": per_group,
    }


def ranking(score: np.ndarray) -> np.ndarray:
    """[layers * heads, 2] (layer, head) pairs, highest score first."""
    order = np.argsort(-score, axis=None, kind="stable")
    return np.stack(np.unravel_index(order, score.shape), 1)


def run(model: AnalysisModel, out_dir, *, captions: Sequence[str] | None = None, images_per_prompt: int = 2):
    """Samples the eval prompts (images_per_prompt seeds each), groups their tokens, captures the synopsis, writes
    synopsis.npz, figures and summary.md under out_dir/synopsis; returns (directory, arrays)."""
    captions = list(captions or [c for c in evaluate.eval_prompt_list(model.config) for _ in range(images_per_prompt)])
    batch_size = min(len(captions), model.config.eval.batch_size)
    start = time.perf_counter()
    images = capture.sampler(model, batch_size)(model.params, model.tables, captions)
    sampled = time.perf_counter()
    cfg = model.model_cfg
    token_groups = groups.image_token_groups(images, captions, cfg.patch_size, radius=model.config.data.radius)
    grouped = time.perf_counter()
    arrays = synopsis(model, captions, token_groups, batch_size)
    captured = time.perf_counter()
    timing = {"plain sampling": sampled - start, "image groups": grouped - sampled, "capture pass": captured - grouped}
    logging.info("Synopsis of %d images: %s", len(captions), {k: round(v, 1) for k, v in timing.items()})
    arrays["bound_fraction"] = np.float32((token_groups[:, :, 0].sum(1) > 0).mean())
    figures = _figures(arrays, model.label, cfg.depth, cfg.num_heads, joint=arch.arch_of(cfg) == "mmdit")
    directory = write_report(out_dir, "synopsis", arrays, figures, _summary(arrays, model, len(captions), timing))
    return directory, arrays


def _figures(arrays: dict, label: str, depth: int, heads: int, joint: bool = False) -> dict:
    plt = pyplot()
    roles = [r for r in groups.TEXT_ROLES if r != "pad"]
    object_view = arrays["cross"][:, :, :, list(OBJECTS)].mean((0, 3))  # [layers, heads, roles]
    fig_roles, axes = plt.subplots(
        1, len(roles), figsize=(2.1 * len(roles), 0.5 * depth + 1.6), squeeze=False, constrained_layout=True
    )
    for ax, role in zip(axes[0], roles):
        # a joint softmax leaves the caption a small share: scale to the largest, not to 1
        _heatmap(ax, object_view[:, :, ROLE[role]], f"-> {role}", vmax=float(object_view.max()) if joint else 1.0)
    attention = "Joint attention (share on the caption)" if joint else "Cross-attention"
    fig_roles.suptitle(f"{attention} of object tokens to each caption role ({label}; mean over steps)")

    fig_rank, axes = plt.subplots(1, 3, figsize=(9, 0.5 * depth + 1.8), squeeze=False, constrained_layout=True)
    _heatmap(axes[0][0], arrays["relation_score"], "relation heads: objects -> relation")
    _heatmap(axes[0][1], arrays["object_score"], "object heads: object -> own shape")
    cross_object = (arrays["self"][:, :, :, 0, 1] + arrays["self"][:, :, :, 1, 0]).mean(0) / 2
    _heatmap(axes[0][2], cross_object, f"{'joint' if joint else 'self'}-attn: object -> other object")
    fig_rank.suptitle(label)

    fig_steps, ax = plt.subplots(figsize=(6, 3.5))
    for layer, head in ranking(arrays["relation_score"])[:3]:
        curve = arrays["cross"][:, layer, head, list(OBJECTS), ROLE["relation"]].mean(-1)
        ax.plot(arrays["timesteps"], curve, marker="o", label=f"L{layer} H{head}")
    ax.invert_xaxis()
    ax.set(xlabel="timestep (sampling runs right)", ylabel="object tokens -> relation", title="Top relation heads")
    ax.legend()
    return {"cross_roles": fig_roles, "head_rankings": fig_rank, "relation_over_steps": fig_steps}


def _heatmap(ax, values: np.ndarray, title: str, vmax: float | None = None) -> None:
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    annotate_cells(ax, image, values)
    ax.set(title=title, xlabel="head", ylabel="layer", xticks=range(values.shape[1]), yticks=range(values.shape[0]))
    ax.title.set_fontsize(8)
    ax.figure.colorbar(image, ax=ax, fraction=0.05)


def _summary(arrays: dict, model: AnalysisModel, num_images: int, timing: dict) -> str:
    lines = [
        f"# Attention synopsis: {model.label}",
        "",
        f"{num_images} images (eval prompts x seeds), {len(arrays['timesteps'])} solver steps, CFG "
        f"{model.config.eval.cfg_scale}; {100 * float(arrays['bound_fraction']):.1f} % of images had both objects "
        "bound by the evaluator (only those count towards the object groups).",
        "",
        "Scores are attention probabilities averaged over solver steps and the two objects' tokens"
        + (
            "; this MM-DiT has one softmax over caption and image keys, so a score is the share of a token's joint "
            "attention that lands on that caption role."
            if arch.arch_of(model.model_cfg) == "mmdit"
            else "."
        ),
        "",
        "| rank | relation head | objects -> relation | object head | object -> own shape |",
        "|---|---|---|---|---|",
    ]
    rel, obj = ranking(arrays["relation_score"]), ranking(arrays["object_score"])
    for i in range(min(5, len(rel))):
        (rl, rh), (ol, oh) = rel[i], obj[i]
        lines.append(
            f"| {i + 1} | L{rl} H{rh} | {arrays['relation_score'][rl, rh]:.3f} | L{ol} H{oh} | "
            f"{arrays['object_score'][ol, oh]:.3f} |"
        )
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()), ""]
    return "\n".join(lines)
