"""Diagnostic D3 (analysis/repulsion_tokens.py): which caption tokens the contextual repulsion moves, read from a
smoke MM-DiT's capture pass, and how the token masks by role (analysis/repulsion.py) show up in it."""

import jax
import numpy as np
import pytest
from tiny_models import noisy

from relcirc_jax.analysis import context, groups, repulsion, repulsion_tokens
from relcirc_jax.config import base_config
from relcirc_jax.models import arch
from relcirc_jax.train import evaluate
from relcirc_jax.train import state as train_state

ROLE = {name: i for i, name in enumerate(groups.TEXT_ROLES)}


@pytest.fixture(scope="module")
def smoke_mmdit(tmp_path_factory):
    config = base_config("rte", "micro", "smoke", arch="mmdit")
    model_cfg = train_state.model_config(config, caption_channels=config.text.dim)
    params = noisy(arch.init_params(model_cfg, jax.random.key(0)))
    model = context.from_params(config, params, tmp_path_factory.mktemp("d3"), "smoke MM-DiT")  # 8 devices
    captions = [p for p in evaluate.eval_prompt_list(config)[:2] for _ in range(4)]
    return model, captions


def _measure(model, captions, tau=1, **fields):
    steps, depth = model.config.eval.num_steps, model.model_cfg.depth
    window = repulsion.first_steps_window(model.config.eval.solver, steps, tau)
    knobs = repulsion.knobs(2.0, window, repulsion.thirds(depth)["all"])
    return repulsion_tokens.measure(model, captions, repulsion.RepulsionConfig(**fields), knobs, group_size=4)


def test_moves_are_read_per_role_inside_the_window_and_follow_the_token_mask(smoke_mmdit):
    model, captions = smoke_mmdit
    depth, steps = model.model_cfg.depth, model.config.eval.num_steps
    images, moves, norms, per_role = _measure(model, captions)
    assert images.shape == (8, 64, 64, 3)
    assert moves.shape == norms.shape == (steps, 8, depth - 1, len(groups.TEXT_ROLES))
    assert np.all(norms[..., ROLE["relation"]] > 0)  # the stream's size is read at every step, repelled or not
    assert per_role[ROLE["relation"]] >= 1 and per_role[ROLE["shape1"]] == 1
    assert np.all(moves[1:] == 0)  # tau = 1: only the first solver step is repelled
    assert np.all(moves[0, :, :, ROLE["pad"]] == 0)  # "valid": the caption's tokens only
    for role in ("color1", "shape1", "relation", "color2", "shape2"):
        assert np.all(moves[0, :, :, ROLE[role]] > 0), role
    shares = repulsion_tokens.shares(moves, norms, per_role)
    assert shares["share"].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(shares["per_block"].sum(1), 1.0, rtol=1e-6)
    assert np.isnan(shares["per_step"][1:]).all()
    # relative to the moved tokens' size, read only where the repulsion acted (step 0): the frozen padding at 0
    assert shares["relative"][ROLE["pad"]] == 0 and np.all(shares["relative"][[ROLE["shape1"], ROLE["relation"]]] > 0)
    np.testing.assert_allclose(
        shares["relative"][ROLE["relation"]],
        moves[0, ..., ROLE["relation"]].sum() / norms[0, ..., ROLE["relation"]].sum(),
        rtol=1e-6,
    )
    twice = repulsion_tokens.shares(2 * moves, norms, per_role)  # twice the move, twice the relative move
    np.testing.assert_allclose(twice["relative"], 2 * shares["relative"], rtol=1e-12)
    assert np.isnan(repulsion_tokens.shares(0 * moves, norms, per_role)["relative"]).all()  # nothing moved

    _, frozen, _, _ = _measure(model, captions, token_mask="no_relation")
    assert np.all(frozen[..., ROLE["relation"]] == 0) and np.all(frozen[0, :, :, ROLE["shape2"]] > 0)
    _, padding, _, _ = _measure(model, captions, token_mask="padding")
    others = [i for i in range(len(groups.TEXT_ROLES)) if i != ROLE["pad"]]
    assert np.all(padding[..., others] == 0) and padding[0, ..., ROLE["pad"]].sum() > 0


def test_moves_are_read_at_the_text_streams_block_out_only(smoke_mmdit):
    model, captions = smoke_mmdit
    for fields in (dict(site="attn_out"), dict(target="image")):
        with pytest.raises(ValueError, match="site 'block_out' of the text stream"):
            _measure(model, captions, **fields)
