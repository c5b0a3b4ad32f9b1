"""Diagnostic D3 of the contextual-repulsion notes (7.4): which caption tokens does the repulsion move?

One capture pass (capture.sampler) samples the study's captions with the text-stream repulsion at one setting and
records, at every solver step and for every block l with a text output, the change the repulsion made to each caption
token: the text stream entering block l + 1 (`blocks.{l+1}.hook_context_pre`) minus the stream block l wrote
(`blocks.{l}.hook_context_post`), so site "block_out" only. Its norm per token, summed over the tokens of each role
(analysis.groups.TEXT_ROLES: colour, shape and relation words, fillers, padding) gives `moves` [steps, samples,
blocks, roles], and from it each role's share of the total movement, also per token of that role (a role with many
tokens can take a large share with small moves). The norms of the tokens before the move, summed alike, give how
far each role moved relative to its size ("relative"): a share says where the movement went, not whether it was
large. The study's token-mask ablations (frontier.VARIANTS "no_relation", "objects", "padding") then ask what the
moved tokens do to the drawn relation; the notes' risk is that repelling the relation words flips it.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from relcirc_jax.analysis import capture, context, groups
from relcirc_jax.analysis import repulsion as repulsion_lib
from relcirc_jax.parallel import rules as sharding_rules


def capture_names(depth: int) -> list[str]:
    """The streams around each repulsion site "block_out" of the blocks with a text output (all but the last)."""
    before = [f"blocks.{layer}.hook_context_post" for layer in range(depth - 1)]
    return before + [f"blocks.{layer + 1}.hook_context_pre" for layer in range(depth - 1)]


def reduce_moves(cache: dict, batch: dict) -> dict:
    """{"moves", "norms"} [B, blocks, roles]: per sample and block, the summed norm of the repulsion's change to the
    tokens of each role (batch["roles"] [B, L]) and the summed norm of those tokens before it."""
    blocks = len([name for name in cache if name.endswith("hook_context_post")])
    roles = jax.nn.one_hot(batch["roles"], len(groups.TEXT_ROLES), dtype=jnp.float32)  # [B, L, R]
    moves, norms = [], []
    for layer in range(blocks):
        before = cache[f"blocks.{layer}.hook_context_post"].astype(jnp.float32)
        delta = cache[f"blocks.{layer + 1}.hook_context_pre"].astype(jnp.float32) - before
        moves.append(jnp.einsum("bl,blr->br", jnp.linalg.norm(delta, axis=-1), roles))
        norms.append(jnp.einsum("bl,blr->br", jnp.linalg.norm(before, axis=-1), roles))
    return {"moves": jnp.stack(moves, 1), "norms": jnp.stack(norms, 1)}


def measure(
    model: context.AnalysisModel,
    captions: Sequence[str],
    config: repulsion_lib.RepulsionConfig,
    knobs: dict,
    group_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 3], moves and norms [steps, N, blocks, roles] (reduce_moves), tokens per role [roles]
    (mean per caption)) of `captions` (consecutive groups of `group_size` samples of one prompt) sampled with the
    repulsion `config` (site "block_out") at the traced `knobs` (repulsion.knobs)."""
    if config.site != "block_out" or "text" not in repulsion_lib.TARGETS[config.target]:
        raise ValueError(
            f"Token moves are read around site 'block_out' of the text stream; got site={config.site!r}, "
            f"target={config.target!r}. Fix: RepulsionConfig(site='block_out', target='text')."
        )
    roles = functools.partial(groups.token_roles, model.conditioner)
    step = math.lcm(group_size, sharding_rules.batch_shards(model.mesh))  # every chunk holds whole groups
    sampler = capture.sampler(
        model,
        math.ceil(len(captions) / step) * step,
        capture_names(model.model_cfg.depth),
        reduce_moves,
        lambda batch_captions: {"roles": roles(batch_captions)},
        generate_kwargs=dict(repulsion=config, group_size=group_size),
        interventions={k: jnp.asarray(v) for k, v in knobs.items()},
    )
    images, captured = sampler(model.params, model.tables, captions)
    per_role = np.eye(len(groups.TEXT_ROLES))[roles(list(captions))].sum(1).mean(0)
    return images, captured["moves"], captured["norms"], per_role


def shares(moves: np.ndarray, norms: np.ndarray, tokens_per_role: np.ndarray) -> dict[str, np.ndarray]:
    """Each role's share of all movement ("share" [roles]), per block ("per_block" [blocks, roles], rows sum to 1
    where anything moved, else NaN), per step ("per_step" [steps, roles], likewise), per token of the role
    ("per_token" [roles]: share / tokens of that role per caption, NaN for roles no caption has), and how far the
    role's tokens moved relative to their norm ("relative" [roles]: summed moves / summed norms over the (step,
    sample, block) cells where the repulsion moved anything; NaN where nothing moved or the role has no tokens)."""
    moves, norms = np.asarray(moves, np.float64), np.asarray(norms, np.float64)
    acted = moves.sum(-1) > 0  # [steps, N, blocks]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_block = moves.sum((0, 1))
        per_step = moves.sum((1, 2))
        share = per_block.sum(0) / per_block.sum()
        return {
            "share": share,
            "per_block": per_block / per_block.sum(1, keepdims=True),
            "per_step": per_step / per_step.sum(1, keepdims=True),
            "per_token": np.where(tokens_per_role > 0, share / tokens_per_role, np.nan),
            "relative": moves[acted].sum(0) / norms[acted].sum(0),
        }


def figure(result: dict[str, np.ndarray], label: str, setting: str):
    """Bars of each role's share (all and per token), and the per-block shares as a heatmap."""
    plt = context.pyplot()
    roles = list(groups.TEXT_ROLES)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.2]})
    x = np.arange(len(roles))
    axes[0].bar(x - 0.2, result["share"], 0.4, label="share of all movement")
    axes[0].bar(x + 0.2, np.nan_to_num(result["per_token"]), 0.4, label="share per token of the role")
    axes[0].set_xticks(x, roles, rotation=45, ha="right")
    axes[0].legend(fontsize=8)
    image = axes[1].imshow(result["per_block"], aspect="auto", cmap="viridis", vmin=0)
    axes[1].set_xticks(x, roles, rotation=45, ha="right")
    axes[1].set_ylabel("block")
    axes[1].set_title("share per block", fontsize=9)
    fig.colorbar(image, ax=axes[1])
    fig.suptitle(f"Which caption tokens the repulsion moves: {label}, {setting}", fontsize=10)
    fig.tight_layout()
    return fig


def summary_lines(result: dict[str, np.ndarray], setting: str) -> list[str]:
    """A markdown table of the shares (the roles that moved or that captions have)."""
    lines = [
        f"Diagnostic D3 (notes 7.4), the text-stream repulsion at {setting}: the share of the summed norm of its "
        "change to the caption tokens, by token role (all blocks and steps; per token: divided by the role's tokens "
        "per caption; move / norm: the role's summed move over the summed norm of its tokens before it, where the "
        "repulsion acted).",
        "",
        "| role | share % | share per token % | move / norm % |",
        "|---|---|---|---|",
    ]
    for i, role in enumerate(groups.TEXT_ROLES):
        if result["share"][i] > 0 or np.isfinite(result["per_token"][i]):
            lines.append(
                f"| {role} | {100 * result['share'][i]:.1f} | {100 * np.nan_to_num(result['per_token'][i]):.1f} "
                f"| {100 * np.nan_to_num(result['relative'][i]):.1f} |"
            )
    return lines
