"""Diagnostic D1 of the contextual-repulsion notes (7.4), `--config.analysis.kind=probe` (MM-DiT only): is the
contextual space structurally informed? Linear probes from the text stream after each block, at each solver step,
to the layout the sample ends with.

One capture pass (capture.sampler) of `probe_prompts` eval prompts x `probe_images` seeds records at every solver
step, per block l, the mean over the caption's valid tokens of the text stream leaving the block
(`blocks.l.hook_context_post` [B, D]; the last block is context_pre_only and has none) and, as the comparison the
notes ask for, the mean over image tokens of the image stream leaving it (`blocks.l.hook_resid_post`; the in-model
stand-in for x0-hat(k)). Each final image gives the sample's layout (x1, y1, x2, y2) / size from the evaluator's
centres (diversity.layouts_from_scores); samples without both objects are dropped.

A prompt's relation alone fixes much of its layout, and that part is the same for every sample of the prompt, so it
cannot be what a repulsion between samples of one prompt acts on. Features and layouts are therefore centred per
prompt, and the probes predict the within-prompt deviation. Ridge probes (standardised features, penalty from
RIDGE_GRID x the mean eigenvalue, chosen by an inner cross-validation on the training folds) fitted on all prompts but
one fold and scored on the held-out prompts (FOLDS folds) give the out-of-fold R^2 = 1 - SSE / SST per (stream,
step, block); every fit is one vmapped solve. R^2 near 0 or below: the stream does not carry that sample's layout at
that point of sampling. The notes' premise predicts a window where the text stream already predicts the layout
(R^2 > 0) while the image stream does not yet.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from relcirc_jax.analysis import capture, context, diversity
from relcirc_jax.data.prompts import parse
from relcirc_jax.diffusion.samplers import model_timesteps
from relcirc_jax.evaluation.scoring import score_specs
from relcirc_jax.models import arch
from relcirc_jax.train import evaluate

FOLDS = 4
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge penalties, x the mean eigenvalue of the standardised Gram matrix
STREAMS = ("text", "image")


def capture_names(depth: int) -> list[str]:
    text = [f"blocks.{layer}.hook_context_post" for layer in range(depth - 1)]
    return text + [f"blocks.{layer}.hook_resid_post" for layer in range(depth - 1)]


def reduce_streams(cache: dict, batch: dict) -> dict:
    """Per sample: the text stream's mean over valid caption tokens and the image stream's mean over image tokens,
    after each block with a text output: {"text", "image"} [B, blocks, D]."""
    blocks = len([name for name in cache if name.endswith("hook_context_post")])
    valid = batch["mask"].astype(jnp.float32)[..., None]  # [B, L, 1]
    text = [
        (cache[f"blocks.{layer}.hook_context_post"].astype(jnp.float32) * valid).sum(1) / valid.sum(1)
        for layer in range(blocks)
    ]
    image = [cache[f"blocks.{layer}.hook_resid_post"].astype(jnp.float32).mean(1) for layer in range(blocks)]
    return {"text": jnp.stack(text, 1), "image": jnp.stack(image, 1)}


def centre_per_prompt(values: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """values [..., N, F] minus the mean of the samples of the same prompt (prompt [N] ids), along axis -2."""
    out = np.array(values, np.float64)
    for p in np.unique(prompt):
        rows = prompt == p
        out[..., rows, :] -= out[..., rows, :].mean(-2, keepdims=True)
    return out


def _ridge_predict(x: jax.Array, targets: jax.Array, train: jax.Array, scale) -> jax.Array:
    """Predictions for every row of x [N, F] by a ridge fitted on the rows train [N] (bool): features standardised
    on those rows, penalty `scale` x the mean eigenvalue of their Gram matrix, no intercept (targets are centred)."""
    weight = train.astype(x.dtype)[:, None]
    count = jnp.maximum(weight.sum(), 1.0)
    mean = (x * weight).sum(0) / count
    std = jnp.sqrt(((x - mean) ** 2 * weight).sum(0) / count) + 1e-6
    z = (x - mean) / std
    gram = (z * weight).T @ z
    penalty = scale * jnp.trace(gram) / gram.shape[0]
    return z @ jnp.linalg.solve(gram + penalty * jnp.eye(gram.shape[0]), (z * weight).T @ targets)


@jax.jit
def cross_validated_r2(features: jax.Array, targets: jax.Array, fold: jax.Array) -> jax.Array:
    """Out-of-fold R^2 of ridge probes features [..., N, F] -> targets [N, T] with fold [N] ids in 0..FOLDS-1:
    [...] (targets already centred, so SST is their sum of squares). Nested: for each held-out fold the penalty is
    the one of RIDGE_GRID with the least squared error over the other folds, each held out in turn from a fit on the
    rest (so the held-out fold never chooses its own penalty)."""
    grid = jnp.asarray(RIDGE_GRID, features.dtype)

    def one(x):
        def inner_sse(k, scale):
            def split(j):
                pred = _ridge_predict(x, targets, (fold != k) & (fold != j), scale)
                held_out = ((fold == j) & (j != k))[:, None]
                return jnp.sum(jnp.where(held_out, (targets - pred) ** 2, 0.0))

            return jax.vmap(split)(jnp.arange(FOLDS)).sum()

        def predict(k):
            sse = jax.vmap(lambda scale: inner_sse(k, scale))(grid)
            pred = _ridge_predict(x, targets, fold != k, grid[jnp.argmin(sse)])
            return jnp.where((fold == k)[:, None], pred, 0.0)

        prediction = jax.vmap(predict)(jnp.arange(FOLDS)).sum(0)
        return 1.0 - jnp.sum((targets - prediction) ** 2) / jnp.sum(targets**2)

    flat = features.reshape((-1,) + features.shape[-2:])
    return jax.vmap(one)(flat).reshape(features.shape[:-2])


def probe(model: context.AnalysisModel, captions: Sequence[str], prompt: np.ndarray, batch_size: int | None = None):
    """{"r2": {stream: [steps, blocks]}, "timesteps", "used" (samples with both objects found), "layout_std"} for
    `captions` (prompt [N]: the prompt id of each caption)."""
    captions, prompt = list(captions), np.asarray(prompt)
    depth = model.model_cfg.depth
    sampler = capture.sampler(model, batch_size or len(captions), capture_names(depth), reduce_streams)
    images, streams = sampler(model.params, model.tables, captions)
    specs = [parse(c).spec for c in captions]
    layouts, valid, _ = diversity.layouts_from_scores(score_specs(images, specs), images.shape[1], specs=specs)
    counts = np.bincount(prompt[valid], minlength=prompt.max() + 1)
    used = valid & (counts[prompt] >= 2)  # a deviation from the prompt's mean needs two samples of it
    ids = np.unique(prompt[used], return_inverse=True)[1]
    fold = ids % FOLDS  # whole prompts per fold
    targets = centre_per_prompt(layouts[used], prompt[used])
    r2 = {}
    for stream in STREAMS:
        values = np.moveaxis(np.asarray(streams[stream])[:, used], 1, 2)  # [steps, blocks, n, D]
        features = centre_per_prompt(values, prompt[used])
        r2[stream] = np.asarray(cross_validated_r2(jnp.float32(features), jnp.float32(targets), jnp.asarray(fold)))
    eval_config = model.config.eval
    return {
        "r2": r2,
        "timesteps": model_timesteps(eval_config.solver, eval_config.num_steps),
        "used": int(used.sum()),
        "layout_std": float(np.sqrt((targets**2).mean())) if used.any() else float("nan"),
    }


def run(model: context.AnalysisModel, out_dir, *, num_prompts: int = 32, images_per_prompt: int = 8):
    """Runs D1 on `num_prompts` eval prompts x `images_per_prompt` seeds and writes `<out_dir>/probe/`."""
    if arch.arch_of(model.model_cfg) != "mmdit":
        raise ValueError("The probe reads an MM-DiT's text stream; this model is a PixArt DiT (static caption).")
    prompts = evaluate.eval_prompt_list(model.config)[:num_prompts]
    captions = [p for p in prompts for _ in range(images_per_prompt)]
    prompt = np.repeat(np.arange(len(prompts)), images_per_prompt)
    result = probe(model, captions, prompt)
    if result["used"] < 2 * FOLDS:
        raise ValueError(
            f"Only {result['used']} of {len(captions)} samples show both objects in prompts with two such samples: "
            "too few to fit a probe. Fix: more --config.analysis.probe_prompts / probe_images, or a trained model."
        )
    arrays = {f"{stream}_r2": result["r2"][stream] for stream in STREAMS}
    arrays["timesteps"] = np.float32(result["timesteps"])
    figures = {"probe_r2": _figure(result, model.label)}
    return context.write_report(out_dir, "probe", arrays, figures, _summary(result, model.label, len(captions)))


def _figure(result: dict, label: str):
    plt = context.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for ax, stream in zip(axes, STREAMS):
        r2 = result["r2"][stream]
        im = ax.imshow(r2.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set(xlabel="solver step (0 = noisiest)", ylabel="block", title=f"{stream} stream -> final layout, R^2")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{label}: out-of-fold R^2 of linear probes (within-prompt deviations, {result['used']} samples)")
    return fig


def _summary(result: dict, label: str, total: int) -> str:
    text, image = result["r2"]["text"], result["r2"]["image"]
    best = np.unravel_index(np.argmax(text), text.shape)
    window = np.flatnonzero((text.max(1) > 0.1) & (image.max(1) < 0.1))
    lines = [
        f"# Probe (notes 7.4 D1): {label}",
        "",
        f"{result['used']} of {total} samples had both objects found in a prompt with two such samples; their "
        f"within-prompt layout deviation has RMS {result['layout_std']:.3f} of the canvas. Out-of-fold R^2 of ridge "
        f"probes ({FOLDS} folds over prompts) from each stream's pooled tokens after each block to that deviation.",
        "",
        "| step | timestep | best text block | text R^2 | best image block | image R^2 |",
        "|---|---|---|---|---|---|",
    ]
    for k, t in enumerate(result["timesteps"]):
        lines.append(
            f"| {k} | {t:.0f} | {int(np.argmax(text[k]))} | {text[k].max():.2f} | {int(np.argmax(image[k]))} | "
            f"{image[k].max():.2f} |"
        )
    lines += [
        "",
        f"Best text probe: block {best[1]} at step {best[0]}, R^2 {text[best]:.2f}.",
        (
            f"Steps where the text stream predicts the layout (R^2 > 0.1) and the image stream does not yet: "
            f"{window.tolist()}: a window for the repulsion's tau and blocks."
            if window.size
            else "No step where the text stream predicts the layout (R^2 > 0.1) before the image stream does: the "
            "premise of contextual repulsion (notes 7.4 D1) does not hold for this model."
        ),
    ]
    return "\n".join(lines) + "\n"
