"""Sampling with capture: one jitted DPM-Solver++/CFG pass that records capture points at every solver step and
reduces them inside the solver's lax.scan, so an analysis never holds [steps, layers, heads, q, k] unless it asks.

Capture points of a DiT (`models.dit.hook_names`), per block l, with B the batch, N = grid^2 image tokens, L caption
tokens, H heads, d the head width and D the hidden width:

    hook_caption                        [B, L, D]     caption tokens after the caption projection
    blocks.l.hook_resid_pre             [B, N, D]     residual stream entering the block
    blocks.l.attn.hook_q / hook_k / v   [B, N, H, d]  self-attention queries, keys, values
    blocks.l.attn.hook_pattern          [B, H, N, N]  self-attention probabilities (query, key)
    blocks.l.attn.hook_z                [B, N, H, d]  per-head outputs after the head masks
    blocks.l.hook_resid_mid             [B, N, D]     after self-attention
    blocks.l.cross_attn.hook_q          [B, N, H, d]  cross-attention queries (from image tokens)
    blocks.l.cross_attn.hook_k / hook_v [B, L, H, d]  cross-attention keys and values (from caption tokens)
    blocks.l.cross_attn.hook_pattern    [B, H, N, L]  cross-attention probabilities (image token, caption token)
    blocks.l.cross_attn.hook_z          [B, N, H, d]
    blocks.l.hook_resid_post            [B, N, D]     after the MLP

Only the conditional half of the CFG batch is passed to the reducer.
"""

from typing import Callable, Sequence

from relcirc_jax.analysis.context import AnalysisModel
from relcirc_jax.train.sampling import Sampler, eval_sampler


def sampler(
    model: AnalysisModel,
    batch_size: int,
    names: Sequence[str] = (),
    reduce: Callable | None = None,
    extra_fields: Callable[[Sequence[str]], dict] | None = None,
    **generate,
) -> Sampler:
    """The model's eval sampler; with `reduce`, its calls return (images, reduce's outputs stacked over steps).

    reduce(cache {name: conditional-half value}, batch) -> pytree whose leaves keep the batch axis first; the call
    returns them as [num_steps, len(captions), ...]. extra_fields(captions) -> {name: [len(captions), ...]} adds
    per-caption inputs (token roles, image-token groups) to the batch reduce reads. Without reduce it samples plainly
    (the same noises, so the same images). `generate` takes Sampler's generate_kwargs and interventions (e.g. a
    repulsion at one setting).
    """
    capture = {} if reduce is None else dict(capture=tuple(names), reduce=reduce, extra_fields=extra_fields)
    return eval_sampler(
        model.config, model.model_cfg, model.conditioner, model.mesh, model.param_sh, batch_size, **capture, **generate
    )
