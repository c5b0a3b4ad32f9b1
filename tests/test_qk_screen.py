"""analysis/qk_screen.py on tiny random DiTs: exact logits against a float64 numpy reference and (MM-DiT) the model's
own q·k, relation tokens in the conditioner's token positions, output shapes, a planted positional head ranked first,
and the report files run() writes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from relcirc_jax.analysis import context, qk_screen
from relcirc_jax.data import prompts, tokenizer
from relcirc_jax.data.spec import RELATIONS, SceneSpec
from relcirc_jax.models import arch, dit, mmdit
from relcirc_jax.text.cache import SPECIAL_ROLE
from relcirc_jax.text.conditioner import TextConditioner, make_text_conditioner
from relcirc_jax.train.sampling import caption_batch

DIM = 32
# Reference gradient of each relation as (coefficient of x, coefficient of y), x = column, y = row (downwards).
GRADIENTS = {
    "above": (0, -1),
    "below": (0, 1),
    "left": (-1, 0),
    "right": (1, 0),
    "upper_left": (-1, -1),
    "upper_right": (1, -1),
    "lower_left": (-1, 1),
    "lower_right": (1, 1),
}


@pytest.fixture(scope="module")
def cfg():
    return dit.dit_config("micro", hidden_size=DIM, depth=2, num_heads=2, caption_channels=DIM)


@pytest.fixture(scope="module")
def conditioner():
    return make_text_conditioner("rte", seed=0, dim=DIM, position_scale=1 / 6)


@pytest.fixture(scope="module")
def params(cfg):
    """Random values in every leaf (biases included), so a mix-up of any term shows."""
    rng = np.random.default_rng(1)
    init = dit.init_params(cfg, jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), init)


def np_params(params) -> dict:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def relation_embeddings(params, conditioner) -> np.ndarray:
    """float64[R, D]: mean over the relation-phrase words of the caption-projected text of each canonical caption."""
    captions = [prompts.caption(SceneSpec("circle", "red", r, "square", "blue")) for r in RELATIONS]
    text = np.asarray(conditioner.embed(conditioner.tables, caption_batch(captions))[0], np.float64)
    p = np_params(params)["caption_projection"]
    hidden = text @ p["linear_1"]["kernel"] + p["linear_1"]["bias"]
    hidden = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden**3)))
    projected = hidden @ p["linear_2"]["kernel"] + p["linear_2"]["bias"]
    is_relation = tokenizer.roles(captions) == prompts.ROLES.index("relation")
    return np.stack([projected[r][is_relation[r]].mean(0) for r in range(len(RELATIONS))])


def reference_logits(params, cfg, conditioner) -> np.ndarray:
    """float64[L, H, R, g, g] by explicit loops over layers and heads."""
    p = np_params(params)
    positions = dit.sincos_2d_position_embedding(cfg.hidden_size, cfg.grid_size, cfg.pos_interpolation_scale)
    positions = positions.astype(np.float64)
    relations = relation_embeddings(params, conditioner)
    dh, g = cfg.head_dim, cfg.grid_size
    out = np.zeros((cfg.depth, cfg.num_heads, len(RELATIONS), g, g))
    for layer in range(cfg.depth):
        attn = p[f"transformer_blocks_{layer}"]["attn2"]
        for head in range(cfg.num_heads):
            cols = slice(head * dh, (head + 1) * dh)
            q = positions @ attn["to_q"]["kernel"][:, cols] + attn["to_q"]["bias"][cols]  # [N, dh]
            k = relations @ attn["to_k"]["kernel"][:, cols] + attn["to_k"]["bias"][cols]  # [R, dh]
            out[layer, head] = (k @ q.T / np.sqrt(dh)).reshape(len(RELATIONS), g, g)
    return out


def test_logits_match_numpy_reference(params, cfg, conditioner):
    got = qk_screen.screen(params, cfg, conditioner, conditioner.tables)["logits"]
    want = reference_logits(params, cfg, conditioner)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.fixture(scope="module")
def mmdit_model():
    """A tiny MM-DiT (config, params) with random values in every leaf, the adaLN linears included."""
    cfg = mmdit.mmdit_config("micro", hidden_size=DIM, depth=2, num_heads=2, caption_channels=DIM)
    rng = np.random.default_rng(2)
    init = arch.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape) + (x.ndim == 1)).astype(np.float32), init)
    return cfg, params


def test_mmdit_logits_match_numpy_reference(mmdit_model, conditioner):
    """The joint attention's image-query -> caption-key logits by explicit loops in float64, following the model's
    forward: the pooled caption and the timestep through time_text_embed, each block's LayerNorm and adaLN modulation
    of the position embedding and of the caption after context_embedder, the projections, the QK RMSNorms, the logit
    averaged over the relation-phrase tokens."""
    cfg, params = mmdit_model
    p = np_params(params)
    timestep = 928.0
    captions = list(qk_screen.relation_captions())
    text, mask = (np.asarray(a, np.float64) for a in conditioner.embed(conditioner.tables, caption_batch(captions)))
    caption = text @ p["context_embedder"]["kernel"] + p["context_embedder"]["bias"]  # [R, T, D]
    is_relation = tokenizer.roles(captions) == prompts.ROLES.index("relation")
    positions = mmdit.sincos_position_embedding(cfg).astype(np.float64)
    dh, g = cfg.head_dim, cfg.grid_size

    def dense(x, layer):
        return x @ layer["kernel"] + layer["bias"]

    def silu(x):
        return x / (1 + np.exp(-x))

    def mlp(x, m):
        return dense(silu(dense(x, m["linear_1"])), m["linear_2"])

    frequencies = np.asarray(dit.timestep_frequencies(jnp.full((len(captions),), timestep)), np.float64)
    pooled = (text * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    embed = p["time_text_embed"]
    temb = mlp(frequencies, embed["timestep_embedder"]) + mlp(pooled, embed["text_embedder"])  # [R, D]

    def modulated(x, linear, chunks, scale_first):
        shift, scale = np.split(dense(silu(temb), linear), chunks, -1)[:2][:: -1 if scale_first else 1]
        normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        return normed * (1 + scale[:, None]) + shift[:, None]

    def rms_norm(x, scale):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale

    want = np.zeros((cfg.depth, cfg.num_heads, len(RELATIONS), g, g))
    for layer in range(cfg.depth):
        block, last = p[f"transformer_blocks_{layer}"], layer == cfg.depth - 1
        image = modulated(positions, block["norm1"]["linear"], 6, False)  # [R, N, D]
        context = modulated(caption, block["norm1_context"]["linear"], 2 if last else 6, last)  # [R, T, D]
        attn = block["attn"]
        for head in range(cfg.num_heads):
            cols = slice(head * dh, (head + 1) * dh)
            for r in range(len(RELATIONS)):
                q = rms_norm(
                    image[r] @ attn["to_q"]["kernel"][:, cols] + attn["to_q"]["bias"][cols], attn["norm_q"]["scale"]
                )
                k = (
                    context[r][is_relation[r]] @ attn["add_k_proj"]["kernel"][:, cols]
                    + attn["add_k_proj"]["bias"][cols]
                )
                k = rms_norm(k, attn["norm_added_k"]["scale"])  # [relation tokens, dh]
                want[layer, head, r] = (q @ k.T / np.sqrt(dh)).mean(1).reshape(g, g)
    got = qk_screen.screen(params, cfg, conditioner, conditioner.tables, timestep)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_mmdit_layer0_matches_model_forward(mmdit_model, conditioner):
    """With the image stream entering block 0 equal to the position embedding (zero image, zero patch projection),
    the screen's layer-0 logits are the model's own image-query -> relation-key logits (attn.hook_q / hook_k) at the
    screen's timestep."""
    cfg, params = mmdit_model
    params = jax.tree.map(np.array, params)
    params["pos_embed"]["proj"] = jax.tree.map(np.zeros_like, params["pos_embed"]["proj"])
    captions = list(qk_screen.relation_captions())
    text, mask = conditioner.embed(conditioner.tables, caption_batch(captions))
    x = np.zeros((len(captions), cfg.image_size, cfg.image_size, cfg.in_channels), np.float32)
    t = np.full(len(captions), qk_screen.DEFAULT_TIMESTEP, np.float32)
    names = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k"]
    _, cache = mmdit.run_with_cache(mmdit.MMDiT(cfg), params, x, t, text, mask, names)
    text_len = text.shape[1]
    q, k = np.asarray(cache[names[0]])[:, text_len:], np.asarray(cache[names[1]])[:, :text_len]  # text first
    is_relation = tokenizer.roles(captions) == prompts.ROLES.index("relation")
    weights = is_relation / is_relation.sum(-1, keepdims=True)
    want = np.einsum("rnhe,rthe,rt->hrn", q, k, weights) / np.sqrt(cfg.head_dim)
    got = qk_screen.screen(params, cfg, conditioner, conditioner.tables)["logits"][0].reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def shifted_conditioner(conditioner) -> TextConditioner:
    """`conditioner` behind a fake special token at position 0 (as an HF encoder's [CLS]), with per-token roles that
    say so (a cached encoder's token_roles, indexed by prompts.caption_index)."""

    def shift(a, first):
        return jnp.concatenate([jnp.full_like(a[:, :1], first), a[:, :-1]], 1)

    def embed(tables, batch):
        text, mask = conditioner.embed(tables, batch)
        return shift(text, 1.0), shift(mask, True)

    captions = list(qk_screen.relation_captions())
    roles = np.zeros((len(prompts.all_captions()) + 1, tokenizer.MAX_LEN), np.int8)
    word_roles = tokenizer.roles(captions)
    roles[[prompts.caption_index(c) for c in captions]] = np.concatenate(
        [np.full((len(captions), 1), SPECIAL_ROLE), word_roles[:, :-1]], 1
    )
    return TextConditioner("shifted", conditioner.dim, conditioner.tables, embed, roles)


def test_relation_tokens_follow_conditioner_token_roles(params, cfg, conditioner):
    """A conditioner whose tokens are shifted by a leading special token gives the logits of the unshifted words: the
    screen averages the columns its token_roles name, not the grammar's word positions."""
    shifted = shifted_conditioner(conditioner)
    got = qk_screen.screen(params, cfg, shifted, shifted.tables)["logits"]
    want = reference_logits(params, cfg, conditioner)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_caption_without_relation_token_raises(params, cfg, conditioner):
    roles = np.zeros((len(prompts.all_captions()) + 1, tokenizer.MAX_LEN), np.int8)  # every token "pad"
    no_relation = conditioner._replace(token_roles=roles)
    with pytest.raises(ValueError, match="no relation-phrase token"):
        qk_screen.screen(params, cfg, no_relation, no_relation.tables)


def test_output_shapes(params, cfg, conditioner):
    out = qk_screen.screen(params, cfg, conditioner, conditioner.tables)
    layers, heads, relations, g = cfg.depth, cfg.num_heads, len(RELATIONS), cfg.grid_size
    assert {k: v.shape for k, v in out.items()} == {
        "logits": (layers, heads, relations, g, g),
        "correlation": (layers, heads, relations),
        "head_score": (layers, heads),
        "signed_score": (layers, heads),
        "ranking": (layers * heads, 2),
    }
    assert np.issubdtype(out["ranking"].dtype, np.integer)
    assert sorted(map(tuple, out["ranking"].tolist())) == [(i, j) for i in range(layers) for j in range(heads)]


def planted_params(params, cfg, conditioner, layer: int = 1, head: int = 0):
    """`params` with attn2 head (layer, head) rewritten so that its q·k for every relation is (up to least-squares
    error) that relation's reference gradient a*x + b*y: q = (x, y, 0, ...), k_r = (a_r, b_r, 0, ...), zero biases."""
    g, dh = cfg.grid_size, cfg.head_dim
    positions = dit.sincos_2d_position_embedding(cfg.hidden_size, g, cfg.pos_interpolation_scale).astype(np.float64)
    rows, cols = np.divmod(np.arange(g * g), g)
    q_target = np.zeros((g * g, dh))
    q_target[:, 0], q_target[:, 1] = cols, rows
    k_target = np.zeros((len(RELATIONS), dh))
    k_target[:, :2] = [GRADIENTS[r] for r in RELATIONS]
    w_q = np.linalg.lstsq(positions, q_target, rcond=None)[0]
    w_k = np.linalg.lstsq(relation_embeddings(params, conditioner), k_target, rcond=None)[0]

    planted = jax.tree.map(np.array, params)  # writable copies
    attn = planted[f"transformer_blocks_{layer}"]["attn2"]
    columns = slice(head * dh, (head + 1) * dh)
    for name, kernel in (("to_q", w_q), ("to_k", w_k)):
        attn[name]["kernel"][:, columns] = kernel
        attn[name]["bias"][columns] = 0.0
    return planted


def test_planted_positional_head_ranks_first(params, cfg, conditioner):
    out = qk_screen.screen(planted_params(params, cfg, conditioner), cfg, conditioner, conditioner.tables)
    assert tuple(out["ranking"][0]) == (1, 0)
    assert out["correlation"][1, 0, RELATIONS.index("above")] > 0.95
    assert out["head_score"][1, 0] > 0.95
    assert out["head_score"][0, 1] < out["head_score"][1, 0] - 0.3


def test_run_writes_report(params, cfg, conditioner, tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    config = ml_collections.ConfigDict(dict(eval=dict(solver="dpmpp_2m", num_steps=14)))
    model = context.AnalysisModel(config, cfg, params, conditioner, conditioner.tables, mesh, None, "tiny test model")
    directory = qk_screen.run(model, tmp_path)
    assert directory == tmp_path / "qk_screen"
    assert sorted(p.name for p in directory.iterdir()) == [
        "head_scores.png",
        "logit_maps.png",
        "qk_screen.npz",
        "summary.md",
    ]
    for name in ("head_scores.png", "logit_maps.png"):
        assert np.asarray(Image.open(directory / name).convert("RGB"), np.float32).std() > 0
    with np.load(directory / "qk_screen.npz") as arrays:
        assert arrays["head_score"].shape == (cfg.depth, cfg.num_heads)
    assert "| 1 |" in (directory / "summary.md").read_text()
