"""Capture during sampling and the attention synopsis, on tiny random DiTs (and one planted relation head)."""

import independent_scenes
import jax
import numpy as np
import pytest
from tiny_models import noisy

from relcirc_jax.analysis import capture, context, groups, synopsis
from relcirc_jax.config import base_config
from relcirc_jax.data import prompts, tokenizer
from relcirc_jax.data.spec import COLORS, SHAPES
from relcirc_jax.models import arch, dit, mmdit
from relcirc_jax.text import cache
from relcirc_jax.train import sampling
from relcirc_jax.train import state as train_state

CAPTIONS = ["red circle is above blue square", "blue triangle is to the left of red circle"]
PLANTED = (1, 0)  # (layer, head) of the hand-set relation head


def _model(tmp_path, devices=None, params=None):
    config = base_config("rte", "micro", "smoke")
    model_cfg = train_state.model_config(config, caption_channels=config.text.dim)
    params = dit.init_params(model_cfg, jax.random.PRNGKey(0)) if params is None else params
    return context.from_params(config, params, tmp_path, "tiny", devices=devices)


def test_capture_shapes_follow_the_shape_table(tmp_path):
    model = _model(tmp_path)
    cfg = model.model_cfg
    names = [
        "hook_caption",
        "blocks.1.attn.hook_pattern",
        "blocks.0.cross_attn.hook_pattern",
        "blocks.1.cross_attn.hook_z",
    ]
    images, captured = capture.sampler(model, 2, names, lambda cache, batch: cache)(
        model.params, model.tables, CAPTIONS * 2
    )
    steps, b, n, h, d = model.config.eval.num_steps, 4, cfg.grid_size**2, cfg.num_heads, cfg.head_dim
    assert images.shape == (b, cfg.image_size, cfg.image_size, 3)
    assert captured["hook_caption"].shape == (steps, b, 20, cfg.hidden_size)
    assert captured["blocks.1.attn.hook_pattern"].shape == (steps, b, h, n, n)
    assert captured["blocks.0.cross_attn.hook_pattern"].shape == (steps, b, h, n, 20)
    assert captured["blocks.1.cross_attn.hook_z"].shape == (steps, b, n, h, d)


def test_capture_pass_draws_the_plain_samplers_images(tmp_path):
    model = _model(tmp_path)
    plain = capture.sampler(model, 4)(model.params, model.tables, CAPTIONS)
    captured_images, _ = capture.sampler(model, 4, ["blocks.0.attn.hook_pattern"], lambda c, b: c)(
        model.params, model.tables, CAPTIONS
    )
    np.testing.assert_allclose(captured_images.astype(int), plain.astype(int), atol=1)


def _caption_tokens(model, captions):
    """The caption-projected tokens the cross-attention keys read, [B, L, D]."""
    text, _ = model.conditioner.embed(model.tables, sampling.caption_batch(captions))
    _, cache = dit.run_with_cache(
        dit.DiT(model.model_cfg),
        model.params,
        *dit.example_inputs(model.model_cfg, len(captions))[:2],
        text,
        np.ones(text.shape[:2], bool),
        ["hook_caption"],
    )
    return np.asarray(cache["hook_caption"], np.float64)


def _plant_relation_head(model, captions):
    """Layer 1 head 0 of cross-attention: a constant query whose logits are +40 on relation tokens, 0 elsewhere."""
    params = jax.tree.map(np.array, model.params)
    layer, head = PLANTED
    cfg = model.model_cfg
    cols = slice(head * cfg.head_dim, (head + 1) * cfg.head_dim)
    attn = params[f"transformer_blocks_{layer}"]["attn2"]
    tokens = _caption_tokens(model, captions).reshape(-1, cfg.hidden_size)
    is_relation = groups.token_roles(model.conditioner, captions).reshape(-1) == groups.TEXT_ROLES.index("relation")
    target = np.zeros((len(tokens), cfg.head_dim))
    target[:, 0] = 40.0 * is_relation * np.sqrt(cfg.head_dim)
    design = np.concatenate([tokens, np.ones((len(tokens), 1))], 1)
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    attn["to_k"]["kernel"][:, cols], attn["to_k"]["bias"][cols] = solution[:-1], solution[-1]
    attn["to_q"]["kernel"][:, cols] = 0.0
    attn["to_q"]["bias"][cols] = np.eye(cfg.head_dim)[0]
    return params


def test_planted_relation_head_is_ranked_first(tmp_path):
    captions = CAPTIONS
    base = _model(tmp_path)
    model = _model(tmp_path, params=_plant_relation_head(base, captions))
    n = model.model_cfg.grid_size**2
    token_groups = np.zeros((len(captions), n, 3), np.float32)
    token_groups[:, : n // 2, 0] = 1  # object 1: the top half of the tokens, object 2 the bottom half
    token_groups[:, n // 2 :, 1] = 1
    arrays = synopsis.synopsis(model, captions, token_groups)
    relation = groups.TEXT_ROLES.index("relation")
    assert tuple(synopsis.ranking(arrays["relation_score"])[0]) == PLANTED
    assert arrays["relation_score"][PLANTED] > 0.99
    assert np.all(np.delete(arrays["relation_score"].ravel(), PLANTED[0] * 2 + PLANTED[1]) < 0.9)
    # each object group's attention sums to one over roles (cross) and over groups (self; no background here)
    np.testing.assert_allclose(arrays["cross"][..., :2, :].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(arrays["self"][..., :2, :].sum(-1), 1.0, rtol=1e-5)
    assert arrays["cross"][:, 1, 0, :2, relation].min() > 0.99


def test_scores_read_each_object_groups_attention_to_its_own_words():
    """summarize on hand-made capture sums: head (0, 0) sends object 1's tokens to shape1 and object 2's to shape2 (an
    object head), head (1, 1) sends each object to the other's shape word (not one), head (0, 1) sends both to the
    relation word, head (1, 0) spreads evenly; the background, all on the relation word, counts for neither score."""
    role = {name: groups.TEXT_ROLES.index(name) for name in ("shape1", "shape2", "relation")}
    steps, batch, roles = 2, 3, len(groups.TEXT_ROLES)
    token_groups = np.zeros((batch, 8, 3), np.float32)
    token_groups[:, :3, 0], token_groups[:, 3:5, 1], token_groups[:, 5:, 2] = 1, 1, 1  # 3, 2 and 3 tokens
    per_token = np.full((2, 2, 3, roles), 1 / roles)  # [layers, heads, group, role], rows sum to 1
    per_token[..., 2, :] = np.eye(roles)[role["relation"]]
    for (layer, head), (first, second) in {
        (0, 0): ("shape1", "shape2"),
        (1, 1): ("shape2", "shape1"),
        (0, 1): ("relation", "relation"),
    }.items():
        per_token[layer, head, 0], per_token[layer, head, 1] = np.eye(roles)[[role[first], role[second]]]
    counts = token_groups.sum(1)[None, :, None, None, :, None]  # [1, B, 1, 1, G, 1]
    cross = np.broadcast_to(per_token, (steps, batch) + per_token.shape) * counts
    sums = {"cross": cross, "self": np.zeros((steps, batch, 2, 2, 3, 3))}
    arrays = synopsis.summarize(sums, token_groups)
    np.testing.assert_allclose(arrays["object_score"], [[1, 0], [1 / roles, 0]], atol=1e-12)
    np.testing.assert_allclose(arrays["relation_score"], [[0, 1], [1 / roles, 0]], atol=1e-12)
    assert tuple(synopsis.ranking(arrays["object_score"])[0]) == (0, 0)
    np.testing.assert_array_equal(arrays["group_tokens"], [9, 6, 9])


def test_an_mmdit_joint_pattern_splits_into_caption_and_image_keys():
    """reduce_attention on an MM-DiT's captured joint patterns equals the numpy sums over its image-query rows, caption
    keys [0, Lt) and image keys [Lt, Lt + N); padded caption keys get exactly nothing, and each object token's
    attention sums to one over both."""
    config = mmdit.mmdit_config("nano", hidden_size=24, depth=2, num_heads=2, caption_channels=16, max_text_len=6)
    params = noisy(arch.init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    text = rng.normal(size=(2, 6, 16)).astype(np.float32)
    text_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    names = synopsis.attention_names(config)
    assert names == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    _, cache = arch.run_with_cache(config, params, x, np.array([300.0, 800.0], np.float32), text, text_mask, names)
    n = config.grid_size**2
    pad = groups.TEXT_ROLES.index("pad")
    roles = rng.choice([r for r in range(len(groups.TEXT_ROLES)) if r != pad], (2, 6))
    roles[~text_mask] = pad
    token_groups = rng.dirichlet(np.ones(3), (2, n)).astype(np.float32)
    got = synopsis.reduce_attention(cache, {"roles": roles, "groups": token_groups})
    joint = np.stack([np.asarray(cache[name], np.float64) for name in names], 1)  # [B, layers, H, 6 + N, 6 + N]
    one_hot = np.eye(len(groups.TEXT_ROLES))[roles]
    cross = np.einsum("bshnl,bng,blr->bshgr", joint[:, :, :, 6:, :6], token_groups, one_hot)
    self_attention = np.einsum("bshnm,bng,bmf->bshgf", joint[:, :, :, 6:, 6:], token_groups, token_groups)
    np.testing.assert_allclose(got["cross"], cross, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["self"], self_attention, rtol=1e-4, atol=1e-6)
    assert np.asarray(got["cross"])[..., pad].max() == 0.0
    total = np.asarray(got["cross"]).sum(-1) + np.asarray(got["self"]).sum(-1)  # [B, layers, H, G]
    np.testing.assert_allclose(total, np.broadcast_to(token_groups.sum(1)[:, None, None], total.shape), rtol=1e-4)


def test_synopsis_on_8_devices_equals_1(tmp_path):
    captions = CAPTIONS * 4
    token_groups = np.random.default_rng(0).uniform(size=(len(captions), 64, 3)).astype(np.float32)
    one = synopsis.synopsis(_model(tmp_path, jax.devices()[:1]), captions, token_groups)
    eight = synopsis.synopsis(_model(tmp_path, jax.devices()), captions, token_groups)
    for key in ("cross", "self", "relation_score", "object_score"):
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-5, atol=1e-7)


def test_a_cached_encoders_special_tokens_get_the_special_role(tmp_path):
    """A cached encoder (MiniLM, T5) stores its tokens' roles with SPECIAL_ROLE for [CLS], </s> and the like; the
    analyses read them as the role "special" (its own column of the synopsis), the word roles unchanged."""
    conditioner = _model(tmp_path).conditioner
    words = np.asarray(tokenizer.roles(CAPTIONS))  # word-level roles, [B, L]
    table = np.full((len(prompts.all_captions()), words.shape[1] + 1), cache.SPECIAL_ROLE, np.int8)
    for caption, row in zip(CAPTIONS, words):
        table[prompts.caption_index(caption), 1:] = row  # a leading special token, as [CLS]
    roles = groups.token_roles(conditioner._replace(token_roles=table), CAPTIONS)
    np.testing.assert_array_equal(roles[:, 0], groups.TEXT_ROLES.index("special"))
    np.testing.assert_array_equal(roles[:, 1:], words)


@pytest.mark.parametrize("size, color_words", [(64, True), (128, True), (64, False)])
def test_image_token_groups_cover_each_object(size, color_words):
    """Scenes from the independent PIL renderer (not the training renderer), at two sizes, captions with and without
    colour words: each object's tokens sit where it was drawn, and every token's weights split between the objects
    and the background (no pixel counted for both objects)."""
    layouts = independent_scenes.sample_layouts(np.random.default_rng(size), 8, size=size)
    images, centers = independent_scenes.render(*layouts, size=size)
    shapes, colors = layouts[0], layouts[1]
    named = [[f"{COLORS[c[k]]} " * color_words + SHAPES[s[k]] for k in (0, 1)] for s, c in zip(shapes, colors)]
    captions = [f"{first} is above {second}" for first, second in named]
    weights = groups.image_token_groups(images, captions, patch_size=size // 8, radius=size / 8)  # [8, 64, 3]
    token_xy = (np.stack(np.divmod(np.arange(64), 8)[::-1], 1) + 0.5) * (size // 8)  # (x, y) of each token centre
    for image in range(len(images)):
        for k in range(2):
            w = weights[image, :, k]
            assert w.sum() > 1
            mean_xy = (w[:, None] * token_xy).sum(0) / w.sum()
            assert np.hypot(*(mean_xy - centers[image, k])) < size / 16  # within half a token of the object's centre
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=0.02)
