"""The analytic FLOP counts (models/flops.py) against XLA's CPU cost analysis, which counts every dot it emits.

The analytic count is matmuls only; XLA also counts elementwise ops (norms, GELU, softmax, AdamW-free here), a few
per cent more, so each check is 1.0 <= XLA / analytic <= 1.05.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from relcirc_jax.models import dit, flops

CASES = [  # (size, batch, caption tokens, caption channels): shapes where each term of the count dominates in turn
    ("nano", 3, 20, 64),
    ("micro", 2, 7, 4096),
    ("nano", 1, 200, 16),  # long captions: the cross-attention scores are ~9 % of the count
]


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _model(size, text_len, caption_channels):
    config = dit.dit_config(size, caption_channels=caption_channels, max_text_len=text_len)
    params = jax.eval_shape(functools.partial(dit.init_params, config), jax.random.PRNGKey(0))  # shapes suffice
    return config, dit.DiT(config), params


@pytest.mark.parametrize("size,batch,text_len,caption_channels", CASES)
def test_counts_match_xla_cost_analysis_of_the_forward_and_the_gradient(size, batch, text_len, caption_channels):
    """The train step's count against the gradient w.r.t. the parameters only, with caption dropout's null caption,
    as the train step computes it."""
    config, model, params = _model(size, text_len, caption_channels)
    x, t, text, mask = dit.example_inputs(config, batch)
    forward = _xla_flops(lambda p, *a: model.apply({"params": p}, *a), params, x, t, text, mask)
    assert 1.0 <= forward / flops.forward_flops(config, batch) <= 1.05

    dropped = jnp.arange(batch) % 2 == 0

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t, text, mask, null_caption_rows=dropped) ** 2)

    gradient = _xla_flops(jax.grad(loss), params)
    assert 1.0 <= gradient / flops.train_step_flops(config, batch) <= 1.05


def test_counts_scale_with_batch_and_depth():
    config = dit.dit_config("micro")
    assert flops.forward_flops(config, 8) == 8 * flops.forward_flops(config, 1)
    deeper = dit.dit_config("micro", depth=12)
    per_block = flops.forward_flops(deeper, 1) - flops.forward_flops(config, 1)
    assert per_block > 0 and per_block % 6 == 0
