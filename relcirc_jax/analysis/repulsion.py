"""On-the-fly repulsion in the contextual space (Dahary et al. 2026; spec: shared/papers/contextual_repulsion_notes.md
sections 2 and 6.4), applied inside the model call, so inside the sampler's `lax.scan`.

In an MM-DiT (models/mmdit.py) the text tokens form a residual stream that every joint block updates from the image,
so each sample of one prompt carries its own text tokens: the "contextual space". After chosen blocks, during the
first sampler steps, each group of B samples of one prompt has its flattened text tokens c_i [N*D] moved M times by
gradient ascent on H, the von Neumann entropy (= log Vendi) of their cosine kernel:

    rho = (K + r I) / (B (1 + r)),   H = -sum lambda log lambda (lambda: eigenvalues of rho),
    raw:      c_i <- c_i + (eta / M) dH/dc_i                 (the paper's eta; it must scale with |c|^2)
    angular:  c_i <- c_i + (eta / M) |c_i|^2 dH/dc_i         (dimensionless: dH/dc_i is proportional to 1 / |c_i|)

The gradient is taken through the B x B entropy only (analysis.diversity's gap-free custom VJP), never through the
network. Samples of different prompts never interact: each half of the CFG batch [cond; uncond] is cut into
consecutive groups of `group_size` rows (a batch that does not split so raises ValueError).

What is static and what is data. `RepulsionConfig` (hashable; a change recompiles) holds M, the site, the target
stream, the kernel and its regulariser, the step mode, the token mask and the group size. The sweep knobs are arrays
the sampler receives with the other interventions (sampling.generate_fn's `interventions`), so a sweep over them
compiles once and can be vmapped:

    repulsion_eta      float32 []       eta (0 = off: the output is bit-identical to the base sampler)
    repulsion_window   float32 [2]      (t_lo, t_hi): model timesteps at which it acts, inclusive; "the first tau
                                        steps" is `first_steps_window(solver, num_steps, tau)`
    repulsion_blocks   float32 [depth]  1 where block l's output is repelled

Sites (`site`): "block_out" moves the stream leaving the block (the default: the residual stream the next block
reads); "attn_out" moves the joint attention's output of that stream before its gate. Targets (`target`): "text"
(the method), "image" (the image tokens of the same blocks: the paper's negative control, notes 2.6) or "both" (each
stream repelled by its own group entropy, notes 7.4 D4). Which caption tokens move (`token_mask`, notes 7.4 D3):
the caption's ("valid", the default), with or only its padding ("all", "padding"), or by role, read from the
batch's "roles": all but the relation words ("no_relation") or only the colour and shape words ("objects"). The image
target also works on the PixArt DiT (models/dit.py, site "block_out" only), the labelled "image-side control (B)" of
notes 6.3; the PixArt text stream is static, so a "text" target there is refused (its gradient is exactly 0).
"pseudo_text" is the PixArt analogue (A) of notes 6.3, labelled as such: caption tokens plus what they read from
the image are repelled, and the change is carried in a per-sample caption (dit.pseudo_contextual_repulsion).
With CFG both halves of the batch are repelled by default (`branches`, the paper's SD3.5 setting); "cond" or
"uncond" leaves the other half alone.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from relcirc_jax.analysis import diversity
from relcirc_jax.analysis.groups import TEXT_ROLES
from relcirc_jax.diffusion import model_timesteps

SITES = ("block_out", "attn_out")
# The streams each target moves; "both" repels the text and the image stream, each by its own group entropy.
TARGETS = {"text": ("text",), "image": ("image",), "pseudo_text": ("pseudo_text",), "both": ("text", "image")}
BRANCHES = ("both", "cond", "uncond")
ETA_MODES = ("angular", "raw")
# Which caption tokens a text-side repulsion moves (notes 7.4 D3): "valid" the caption's tokens, "all" the padding
# too, "padding" the padding only; by role (analysis.groups.TEXT_ROLES, read from the batch's "roles"):
# "no_relation" the caption's tokens but the relation words (frozen), "objects" only colour and shape words.
ROLE_TOKEN_MASKS = {
    "no_relation": tuple(role for role in TEXT_ROLES if role != "relation"),
    "objects": ("color1", "shape1", "color2", "shape2"),
}
TOKEN_MASKS = ("valid", "all", "padding") + tuple(ROLE_TOKEN_MASKS)
# The traced knobs, as keys of sampling.generate_fn's `interventions`.
KNOBS = ("repulsion_eta", "repulsion_window", "repulsion_blocks")


@jax.tree_util.register_static  # a pytree without leaves: a Repulsion crosses jit boundaries as its traced knobs
@dataclasses.dataclass(frozen=True)
class RepulsionConfig:
    """The static part of a repulsion (module docstring); the defaults are the paper's, with the angular step."""

    inner_steps: int = 50  # M, Euler steps of the gradient flow within one block call
    site: str = "block_out"
    target: str = "text"
    branches: str = "both"
    kernel: str = "cosine"
    q: float = 1.0  # entropy order (1 = von Neumann, the paper's)
    kernel_reg: float = 1e-4  # r: rho = (K + r I) / (B (1 + r)), as the SD3.5 re-implementation
    eta_mode: str = "angular"
    token_mask: str = "valid"  # text target: "valid" repels the caption's tokens only, "all" the padding too
    # B: consecutive rows of the batch share a prompt. sampling.generate_fn sets it from its own group_size, the one
    # particle guidance reads too, so a sampler has one group size.
    group_size: int = 4
    # The vmap axis of a screen over knob settings (parallel/axes.SETTINGS; sampling.generate_fn sets it): the work
    # is skipped only when no group of any setting is on, so that vmap keeps the skip instead of computing it always.
    settings_axis: str | None = None

    def __post_init__(self):
        for name, allowed in (
            ("site", SITES),
            ("target", TARGETS),
            ("branches", BRANCHES),
            ("kernel", diversity.KERNELS),
            ("eta_mode", ETA_MODES),
            ("token_mask", TOKEN_MASKS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RepulsionConfig.{name}={getattr(self, name)!r} is unknown; choose one of {allowed}.")
        if self.inner_steps < 1 or self.group_size < 2:
            raise ValueError(
                f"RepulsionConfig needs inner_steps >= 1 and group_size >= 2 (got {self.inner_steps}, "
                f"{self.group_size}): a repulsion acts between at least two samples of one prompt."
            )


class Repulsion(NamedTuple):
    """What a model call receives: the static config, the traced knobs, which rows may move ([B] bool: the CFG
    branches `branches` selects) and, for a token mask by role, the caption tokens' roles ([B, L] int32 into
    analysis.groups.TEXT_ROLES; `cfg_roles`)."""

    config: RepulsionConfig
    eta: jax.Array
    window: jax.Array
    blocks: jax.Array
    rows_on: jax.Array
    roles: jax.Array | None = None

    def apply(self, value: jax.Array, layer: int, site: str, stream: str, t: jax.Array, text_mask=None) -> jax.Array:
        """`value` [batch, tokens, D] of `stream` ("text", "image", "pseudo_text") at `site` of block `layer`,
        repelled within each group where the knobs switch it on at timestep t [batch]; unchanged (the same array)
        elsewhere. text_mask [batch, tokens]: the caption's valid tokens, for a caption-side stream (None: all)."""
        cfg = self.config
        if site != cfg.site or stream not in TARGETS[cfg.target]:
            return value
        in_window = (t >= self.window[0]) & (t <= self.window[1])
        rows = self.rows_on & in_window & (self.eta > 0) & (self.blocks[layer] > 0)
        every_token = jnp.ones(value.shape[:2], bool)
        if stream == "image":
            tokens = every_token
        else:
            tokens = selected_tokens(cfg.token_mask, every_token if text_mask is None else text_mask, self.roles)
        return repel_groups(value, tokens, rows, self.eta, cfg)


def selected_tokens(token_mask: str, text_mask: jax.Array, roles: jax.Array | None) -> jax.Array:
    """bool [batch, L]: the caption tokens a text-side repulsion moves under `token_mask` (TOKEN_MASKS)."""
    text_mask = text_mask.astype(bool)
    if token_mask == "all":
        return jnp.ones_like(text_mask)
    if token_mask == "valid":
        return text_mask
    if token_mask == "padding":
        return ~text_mask
    if roles is None:
        raise ValueError(
            f"RepulsionConfig.token_mask={token_mask!r} selects caption tokens by role, and the batch has none. Fix: "
            "add batch['roles'] = analysis.groups.token_roles(conditioner, captions) (interventions.screen and "
            "the capture samplers do)."
        )
    keep = jnp.asarray([role in ROLE_TOKEN_MASKS[token_mask] for role in TEXT_ROLES])
    return text_mask & keep[roles]


def cfg_roles(config: RepulsionConfig, roles) -> jax.Array | None:
    """The roles of a CFG batch [cond; uncond] from the conditional captions' roles [B, L] (None: not needed, or
    not given). The negative caption names no object or relation: its tokens count as padding."""
    if config.token_mask not in ROLE_TOKEN_MASKS or roles is None:
        return None
    roles = jnp.asarray(roles, jnp.int32)
    return jnp.concatenate([roles, jnp.full_like(roles, TEXT_ROLES.index("pad"))])


def repel_groups(tokens: jax.Array, token_mask: jax.Array, rows_on: jax.Array, eta, config: RepulsionConfig):
    """tokens [batch, N, D] of a CFG batch [cond; uncond] repelled group by group (consecutive `group_size` rows of
    each half), in groups whose rows are all switched on by rows_on [batch]; other groups, and masked-out tokens
    (token_mask [batch, N] False), are returned unchanged. Skips the work (lax.cond) when no group is on."""
    batch, b = tokens.shape[0], config.group_size
    check_cfg_groups(batch, b)
    groups = tokens.reshape((batch // b, b) + tokens.shape[1:])
    masks = token_mask.reshape(batch // b, b, -1)
    group_on = jnp.all(rows_on.reshape(batch // b, b), axis=1)

    def repel_all(groups):
        moved = jax.vmap(lambda x, m: repel_group(x, m, eta, config))(groups, masks)
        return jnp.where(group_on[:, None, None, None], moved, groups)

    any_on = jnp.any(group_on)
    if config.settings_axis is not None:
        any_on = jax.lax.pmax(any_on.astype(jnp.int32), config.settings_axis) > 0
    out = jax.lax.cond(any_on, repel_all, lambda g: g, groups)
    return out.reshape(tokens.shape)


def check_groups(batch: int, group_size: int, method: str) -> None:
    """ValueError unless a batch of `batch` rows splits into groups of `group_size` samples of one prompt."""
    if batch % group_size:
        raise ValueError(
            f"{method} batch of {batch} rows does not split into groups of {group_size} samples per prompt: a group "
            "would straddle two prompts (and, under CFG, the conditional and unconditional halves). Fix: make the "
            "number of images per prompt (and the sampling batch) a multiple of the group size."
        )


def check_cfg_groups(rows: int, group_size: int) -> None:
    """ValueError unless each half of a CFG batch [cond; uncond] of `rows` rows splits into groups of `group_size`
    (a group across the boundary would repel one prompt's conditional rows against another's unconditional ones)."""
    if rows % 2:
        raise ValueError(
            f"A repulsion acts on a CFG batch [cond; uncond], which has an even number of rows; got {rows}."
        )
    check_groups(rows // 2, group_size, "A repulsion's CFG half: its")


def check_caption_groups(captions, group_size: int) -> None:
    """ValueError unless every group of `group_size` consecutive captions holds one caption (a prompt's samples)."""
    for start in range(0, len(captions), group_size):
        group = set(captions[start : start + group_size])
        if len(group) > 1:
            raise ValueError(
                f"Captions {start}..{start + group_size - 1} form one repulsion group but name {len(group)} prompts "
                f"({sorted(group)}): a group would straddle prompts. Fix: list each prompt's samples consecutively, "
                f"a multiple of {group_size} of them."
            )


def group_entropy(vectors: jax.Array, config: RepulsionConfig) -> jax.Array:
    """H_q of the regularised kernel of vectors [B, F] (module docstring)."""
    kernel = diversity.kernel_matrix(vectors, config.kernel)
    n, reg = vectors.shape[0], config.kernel_reg
    rho = (kernel + reg * jnp.eye(n, dtype=kernel.dtype)) / (n * (1.0 + reg))
    return diversity.spectral_entropy(rho, config.q)


def repel_group(tokens: jax.Array, token_mask: jax.Array, eta, config: RepulsionConfig) -> jax.Array:
    """One prompt's tokens [B, N, D] after M Euler steps of gradient ascent on the entropy of their flattened
    masked vectors (float32 inside; returned in tokens' dtype; masked-out tokens unchanged)."""
    mask = token_mask.astype(jnp.float32)[..., None]
    start = jax.lax.stop_gradient(tokens.astype(jnp.float32) * mask).reshape(tokens.shape[0], -1)
    grad = jax.grad(lambda c: group_entropy(c, config))
    step = jnp.asarray(eta, jnp.float32) / config.inner_steps

    def body(_, c):
        g = grad(c)
        if config.eta_mode == "angular":
            g = g * jnp.sum(c * c, axis=1, keepdims=True)
        return c + step * g

    moved = jax.lax.fori_loop(0, config.inner_steps, body, start)
    delta = (moved - start).reshape(tokens.shape) * mask
    return (tokens.astype(jnp.float32) + delta).astype(tokens.dtype)


def rows_on(config: RepulsionConfig, batch: int) -> jax.Array:
    """bool [2 * batch] for a CFG batch laid out [cond; uncond]: the rows `config.branches` lets move."""
    cond, uncond = {"both": (True, True), "cond": (True, False), "uncond": (False, True)}[config.branches]
    return jnp.concatenate([jnp.full((batch,), cond), jnp.full((batch,), uncond)])


def first_steps_window(solver: str, num_steps: int, tau: int) -> np.ndarray:
    """float32 [2]: the model-timestep window of the first `tau` solver steps (tau = 0: an empty window)."""
    timesteps = model_timesteps(solver, num_steps)
    if tau <= 0:
        return np.array([np.inf, np.inf], np.float32)
    return np.array([timesteps[min(tau, num_steps) - 1], timesteps[0]], np.float32)


def knobs(eta: float, window, blocks) -> dict[str, np.ndarray]:
    """The traced knobs as `interventions` entries (float32)."""
    return {
        "repulsion_eta": np.float32(eta),
        "repulsion_window": np.asarray(window, np.float32),
        "repulsion_blocks": np.asarray(blocks, np.float32),
    }


def thirds(depth: int, *, text: bool = True) -> dict[str, np.ndarray]:
    """Block selections of notes 7.3: "all", and the "first", "middle" and "last" third of the usable blocks: those
    with a text output for a text-side target (the MM-DiT's last block is context_pre_only, so text repulsion there
    is a no-op), every block for the image target (text=False). Below 3 usable blocks the thirds collapse; an empty
    third, or one that repeats an earlier selection, is left out, so every name is a distinct setting."""
    usable = max(depth - 1, 1) if text else depth
    edges = np.linspace(0, usable, 4).round().astype(int)
    out = {"all": np.r_[np.ones(usable), np.zeros(depth - usable)].astype(np.float32)}
    for name, lo, hi in zip(("first", "middle", "last"), edges[:-1], edges[1:]):
        sel = np.zeros(depth, np.float32)
        sel[lo:hi] = 1
        if sel.any() and not any(np.array_equal(sel, seen) for seen in out.values()):
            out[name] = sel
    return out
