"""Analytic FLOP counts of the PixArt DiT: its forward pass and its train step, matmuls only (2 FLOPs per
multiply-add).

Why not XLA's cost analysis: on a GPU it leaves out the matmuls XLA hands to cuBLAS, so it undercounts a train step
several-fold; on a CPU it counts every dot and agrees with this count to a few per cent (the rest are elementwise
ops; tests/test_flops.py checks both passes). Benchmarks divide these counts by wall time to get achieved FLOP/s.
"""

from relcirc_jax.models.dit import TIMESTEP_FREQUENCY_DIM, DiTConfig


def _dense(tokens: int, fan_in: int, fan_out: int) -> int:
    """A [tokens, fan_in] x [fan_in, fan_out] matmul. In the names below: n image tokens, text caption tokens, d the
    hidden size."""
    return 2 * tokens * fan_in * fan_out


def _first_layers(config: DiTConfig) -> int:
    """Per image: the layers applied to the inputs (patch projection, caption projection's linear_1, timestep
    MLP's linear_1), whose input gradient training never computes."""
    n, text, d = config.grid_size**2, config.max_text_len, config.hidden_size
    patch_in = config.patch_size**2 * config.in_channels
    return _dense(n, patch_in, d) + _dense(text, config.caption_channels, d) + _dense(1, TIMESTEP_FREQUENCY_DIM, d)


def _caption_projection(config: DiTConfig) -> int:
    text, d = config.max_text_len, config.hidden_size
    return _dense(text, config.caption_channels, d) + _dense(text, d, d)


def forward_flops(config: DiTConfig, batch: int) -> int:
    """Matmul FLOPs of one forward pass of `batch` images with captions of `config.max_text_len` tokens."""
    n, text, d = config.grid_size**2, config.max_text_len, config.hidden_size
    patch_in = config.patch_size**2 * config.in_channels
    patch_out = config.patch_size**2 * config.out_channels
    embed = _dense(n, patch_in, d) + _dense(1, TIMESTEP_FREQUENCY_DIM, d) + _dense(1, d, d) + _dense(1, d, 6 * d)
    block = (
        _dense(n, d, 4 * d)  # self-attention q, k, v, out
        + 2 * _dense(n, n, d)  # self-attention scores and values
        + _dense(n, d, 2 * d)  # cross-attention q, out
        + _dense(text, d, 2 * d)  # cross-attention k, v (caption tokens)
        + 2 * _dense(n, text, d)  # cross-attention scores and values
        + _dense(n, d, config.mlp_dim)
        + _dense(n, config.mlp_dim, d)
    )
    per_image = embed + _caption_projection(config) + config.depth * block + _dense(n, d, patch_out)
    return batch * per_image


def train_step_flops(config: DiTConfig, batch: int) -> int:
    """Matmul FLOPs of one train step: the forward pass, the backward pass (twice the forward's matmuls, less the
    input gradients of the first layers) and the learned null caption's projection (caption dropout)."""
    return 3 * forward_flops(config, batch) - batch * _first_layers(config) + 3 * _caption_projection(config)
