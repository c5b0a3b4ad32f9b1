"""Head ablation: sample the eval prompts with attention heads knocked out and score what changes.

A mask row is [kinds, depth, heads] (1 = keep, 0 = ablate); the kinds of head are the model's
(`interventions.head_kinds`): a PixArt DiT's self- and cross-attention, an MM-DiT's joint attention (one head there acts
on text and image queries alike). "zero" ablation multiplies the head's output z by the mask (`self_head_mask` /
`cross_head_mask`); "mean" ablation replaces it, at each query position, by its mean over the batch of the same forward
pass, the conditional and the unconditional CFG halves apart and padding rows left out (`*_head_mean_mask`,
models/attention.group_mean; in an MM-DiT over the rows where a caption token is valid), so the head keeps its average
output and its average guidance contribution and loses what is specific to the prompt and noise. The masks are data, so
a screen is one jitted `vmap(generate)` over chunks of masks. Every mask samples the same captions from the same noises
(image i's noise depends on i alone), so effects are paired: effect = accuracy(mask) - accuracy(all-ones baseline), with
paired cluster bootstrap confidence intervals over prompts.
"""

import time
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from relcirc_jax.analysis import bootstrap, context, interventions
from relcirc_jax.evaluation.scoring import METRICS
from relcirc_jax.train import evaluate, sampling

KINDS = interventions.HEAD_KINDS["pixart"]  # axis 1 of a PixArt DiT's mask array
MASK_KEYS = {"zero": "mask", "mean": "mean_mask"}  # the intervention (interventions.head_keyword) of each mode
RANK_METRIC = "spatial_relationship"  # heads are ranked by their effect on this metric
# Shown in the effect maps and set comparisons: the strict relation (its +-2.5 px at 64 px makes straight relations
# mostly position jitter), the loose one (the paper's column), the binding it is gated on, and overall.
REPORT_METRICS = ("spatial_relationship", "spatial_relationship_loose", "unique_binding", "overall")
NUM_RESAMPLES = 1000
SCORE_BLOCK_IMAGES = 8192  # images scored per detector call (bounds the detector's memory)
GRID_IMAGES = 8  # images per row of the sample grid

Head = tuple[str, int, int]  # (kind, layer, head)


def single_head_masks(depth: int, heads: int, kinds: Sequence[str] = KINDS) -> np.ndarray:
    """float32 [1 + K * depth * heads, K, depth, heads] with K = len(kinds): the all-ones baseline, then one mask per
    head with only that head zeroed, in the order of `single_head_labels` (kind by kind, layer by layer)."""
    shape = (len(kinds), depth, heads)
    rows = np.arange(int(np.prod(shape)))
    masks = np.ones((1 + len(rows), *shape), np.float32)
    masks[(1 + rows, *np.unravel_index(rows, shape))] = 0.0
    return masks


def single_head_labels(depth: int, heads: int, kinds: Sequence[str] = KINDS) -> list[Head]:
    """(kind, layer, head) ablated by row i + 1 of `single_head_masks`."""
    return [(kind, layer, head) for kind in kinds for layer in range(depth) for head in range(heads)]


def _kind_index(kind, kinds: Sequence[str]) -> int:
    if isinstance(kind, (int, np.integer)) and 0 <= kind < len(kinds):
        return int(kind)
    if kind not in kinds:
        raise ValueError(f"Unknown head kind {kind!r}; this model's are {tuple(kinds)} (or their index).")
    return list(kinds).index(kind)


def _normalized(heads_to_ablate: Sequence, depth: int, heads: int, kinds: Sequence[str]) -> list[Head]:
    out = []
    for kind, layer, head in heads_to_ablate:
        if not (0 <= layer < depth and 0 <= head < heads):
            raise ValueError(f"Head {(kind, layer, head)} is outside the model's {depth} layers x {heads} heads.")
        out.append((kinds[_kind_index(kind, kinds)], int(layer), int(head)))
    if len(set(out)) != len(out):
        raise ValueError(f"Repeated head in {out}.")
    return out


def _set_mask(depth: int, heads: int, head_set: Sequence[Head], kinds: Sequence[str]) -> np.ndarray:
    mask = np.ones((len(kinds), depth, heads), np.float32)
    for kind, layer, head in head_set:
        mask[_kind_index(kind, kinds), layer, head] = 0.0
    return mask


def head_set_masks(
    depth: int,
    heads: int,
    heads_to_ablate: Sequence,
    *,
    num_random: int = 0,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
) -> tuple[np.ndarray, list[list[Head]]]:
    """(masks [2 + num_random, K, depth, heads], the head sets of rows 1...): row 0 the all-ones baseline, row 1 the
    chosen heads ablated together, then `num_random` random sets of the same size and the same kinds (as many heads
    of each kind as the chosen set), drawn without the chosen heads when enough others remain."""
    chosen = _normalized(heads_to_ablate, depth, heads, kinds)
    rng = np.random.default_rng(seed)
    sets = [chosen]
    for _ in range(num_random):
        random_set = []
        for kind in kinds:
            wanted = sum(k == kind for k, _, _ in chosen)
            pool = [(kind, layer, head) for layer in range(depth) for head in range(heads)]
            others = [h for h in pool if h not in chosen]
            pool = others if len(others) >= wanted else pool
            random_set += [pool[i] for i in sorted(rng.choice(len(pool), wanted, replace=False))]
        sets.append(random_set)
    masks = np.stack(
        [np.ones((len(kinds), depth, heads), np.float32)] + [_set_mask(depth, heads, s, kinds) for s in sets]
    )
    return masks, sets


def top_relation_heads(model: context.AnalysisModel, k: int) -> list[Head]:
    """The k heads the QK screen ranks first (weights only, no sampling): a PixArt DiT's cross-attention heads, an
    MM-DiT's joint heads."""
    from relcirc_jax.analysis import qk_screen

    ranking = qk_screen.screen(model.params, model.model_cfg, model.conditioner, model.tables)["ranking"]
    kind = interventions.head_kinds(model.model_cfg)[-1]
    return [(kind, int(layer), int(head)) for layer, head in ranking[:k]]


def screen(
    model: context.AnalysisModel, captions: Sequence[str], masks: np.ndarray, *, mode: str = "zero", chunk: int = 8
) -> np.ndarray:
    """uint8 [M, len(captions), H, W, 3]: the captions sampled under each mask of `masks` [M, K, depth, heads] with
    the model config's eval sampler (solver, steps, CFG, seed, negative); image i's noise depends only on i.

    The masks run `chunk` at a time through one compiled `vmap(generate)`; the result does not depend on the mesh, but
    another `chunk` changes the batched matmuls' shapes and so their float rounding (the odd pixel one level off)."""
    return _screen(model, captions, masks, mode=mode, chunk=chunk)[0]


def _screen(model, captions, masks, *, mode: str, chunk: int) -> tuple[np.ndarray, dict[str, float]]:
    """(images, {"compile_s", "run_s"})."""
    cfg = model.model_cfg
    if mode not in MASK_KEYS:
        raise ValueError(f"Unknown ablation mode {mode!r}; use one of {tuple(MASK_KEYS)}.")
    masks, kinds = np.asarray(masks, np.float32), interventions.head_kinds(cfg)
    expected = (len(kinds), cfg.depth, cfg.num_heads)
    if masks.ndim != 4 or masks.shape[1:] != expected or not len(masks):
        raise ValueError(
            f"masks has shape {masks.shape}; this model's are [M >= 1, kinds {kinds}, depth, heads] = [M, "
            f"{', '.join(map(str, expected))}]."
        )
    arrays = {interventions.head_keyword(kind, MASK_KEYS[mode]): masks[:, i] for i, kind in enumerate(kinds)}
    return interventions.screen(model, captions, arrays, chunk=chunk, label=f"Ablation screen ({mode})")


def effects(
    images: np.ndarray,
    captions: Sequence[str],
    *,
    shape: tuple[int, int, int] | None = None,
    detector: str = "relcirc",
    num_resamples: int = NUM_RESAMPLES,
    seed: int = 0,
    clusters: Sequence | None = None,
) -> dict[str, np.ndarray]:
    """Scores images [M, N, H, W, 3] (row 0 the baseline) against their N captions; K = len(METRICS).

    Returns "correct" bool [M, N, K], "accuracy" [M, K], "effect" = accuracy - accuracy[0] [M, K], and "ci_low" /
    "ci_high" [M, K]: the 95 % percentile interval of the effect over `num_resamples` paired cluster bootstrap
    resamples (bootstrap.cluster_weights, seeded `seed`). Images of one prompt share its effect, so a resample draws
    whole prompts: the images with one caption (or one label of `clusters` [N]), the same ones for the baseline and
    every mask. "sim_low" / "sim_high" [M, K] are simultaneous 95 % intervals over masks 1..M-1 (studentized max:
    each mask's effect +- q * its bootstrap standard deviation, q the 95th percentile over resamples of the largest
    |deviation| / sd of any mask), so a head picked as the most harmful of many keeps its coverage. With `shape` =
    (kinds, depth, heads), a mask's shape, and the rows of `single_head_masks`, also "effect_map" [kinds, depth,
    heads, K] (and ci maps).
    """
    images = np.asarray(images)
    captions = list(captions)
    num_masks, n = images.shape[:2]
    if n != len(captions):
        raise ValueError(f"images has {n} images per mask but there are {len(captions)} captions.")
    correct = np.zeros((num_masks, n, len(METRICS)), bool)
    block = max(1, SCORE_BLOCK_IMAGES // n)
    for start in range(0, num_masks, block):
        rows = images[start : start + block]
        scores, _ = evaluate.score_images(rows.reshape((-1,) + rows.shape[2:]), captions * len(rows), detector)
        correct[start : start + len(rows)] = np.stack([scores[m].reshape(len(rows), n) for m in METRICS], -1)
    accuracy = correct.mean(1)
    weights = bootstrap.cluster_weights(captions if clusters is None else clusters, num_resamples, seed)  # [R, N]
    resampled = np.einsum("rn,mnk->rmk", weights, correct.astype(np.float64)) / weights.sum(1)[:, None, None]
    resampled_effect = resampled - resampled[:, :1]
    effect = accuracy - accuracy[:1]
    half_width = _simultaneous_half_width(resampled_effect, effect)
    out = {
        "correct": correct,
        "accuracy": accuracy,
        "effect": effect,
        "ci_low": np.percentile(resampled_effect, 2.5, axis=0),
        "ci_high": np.percentile(resampled_effect, 97.5, axis=0),
        "sim_low": effect - half_width,
        "sim_high": effect + half_width,
    }
    if shape is not None:
        heads = int(np.prod(shape))
        if num_masks != 1 + heads:
            raise ValueError(f"{num_masks} masks are not the {1 + heads} rows of single_head_masks of shape {shape}.")
        for name in ("effect", "ci_low", "ci_high"):
            out[f"{name}_map"] = out[name][1:].reshape(*shape, -1)
    return out


def _simultaneous_half_width(resampled_effect: np.ndarray, effect: np.ndarray) -> np.ndarray:
    """[M, K] half-widths of the studentized-max 95 % band over masks 1..M-1 (row 0, the baseline, gets 0) from the
    bootstrap effects [R, M, K]; a mask whose effect never varies gets 0."""
    sd = resampled_effect.std(axis=0)  # [M, K]
    studentized = np.abs(resampled_effect - effect) / np.where(sd > 0, sd, np.inf)
    q = np.percentile(studentized[:, 1:].max(axis=1), 95, axis=0) if len(effect) > 1 else np.zeros(effect.shape[1:])
    return np.concatenate([np.zeros_like(sd[:1]), q * sd[1:]])


def set_vs_random(
    model: context.AnalysisModel,
    captions: Sequence[str],
    chosen: Sequence,
    num_random: int = 8,
    seed: int = 0,
    *,
    mode: str = "zero",
    chunk: int = 8,
) -> dict:
    """Ablates the `chosen` heads ((kind, layer, head), ...) together and `num_random` random sets of the same size and
    kinds; returns {"sets", "masks", "effects" (effects() of [baseline, chosen, random...]), "comparison": {metric:
    {"chosen", "chosen_ci", "random" [num_random], "random_mean", "random_min", "random_max",
    "fraction_random_as_harmful"}} for the metrics in REPORT_METRICS}."""
    cfg = model.model_cfg
    masks, sets = head_set_masks(
        cfg.depth, cfg.num_heads, chosen, num_random=num_random, seed=seed, kinds=interventions.head_kinds(cfg)
    )
    images = screen(model, captions, masks, mode=mode, chunk=chunk)
    result = effects(images, captions)
    comparison = {}
    for metric in REPORT_METRICS:
        k = METRICS.index(metric)
        chosen_effect, random = float(result["effect"][1, k]), result["effect"][2:, k]
        comparison[metric] = {
            "chosen": chosen_effect,
            "chosen_ci": (float(result["ci_low"][1, k]), float(result["ci_high"][1, k])),
            "random": random,
            "random_mean": float(random.mean()) if len(random) else float("nan"),
            "random_min": float(random.min()) if len(random) else float("nan"),
            "random_max": float(random.max()) if len(random) else float("nan"),
            "fraction_random_as_harmful": float((random <= chosen_effect).mean()) if len(random) else float("nan"),
        }
    return {"sets": sets, "masks": masks, "effects": result, "comparison": comparison}


def effect_map_figure(effect_map: np.ndarray, mode: str, label: str, kinds: Sequence[str] = KINDS):
    """[len(REPORT_METRICS) rows x kinds] heatmaps of [layer x head] effects, values in the cells."""
    plt = context.pyplot()
    depth, heads = effect_map.shape[1:3]
    fig, axes = plt.subplots(
        len(REPORT_METRICS),
        len(kinds),
        figsize=(len(kinds) * (2.4 + 0.55 * heads), len(REPORT_METRICS) * (1.2 + 0.45 * depth)),
        squeeze=False,
        constrained_layout=True,
    )
    for row, metric in enumerate(REPORT_METRICS):
        values = effect_map[..., METRICS.index(metric)]
        limit = max(float(np.abs(values).max()), 0.01)
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            im = ax.imshow(values[col], cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            context.annotate_cells(ax, im, values[col], "+.2f")
            ax.set_title(f"{kind}-attention\n{metric}", fontsize=8)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(heads))
            ax.set_yticks(range(depth))
        fig.colorbar(im, ax=axes[row].tolist(), shrink=0.8, label="accuracy change")
    fig.suptitle(f"{label}: {mode}-ablation of one head, effect on accuracy", fontsize=10)
    return fig


def sample_grid_figure(baseline: np.ndarray, ablated: np.ndarray, head: Head, mode: str, label: str):
    """The same captions and noises sampled without and with the ablation, side by side."""
    plt = context.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4), constrained_layout=True)
    for ax, images, title in (
        (axes[0], baseline, "baseline"),
        (axes[1], ablated, f"{head[0]}-attention L{head[1]} H{head[2]} {mode}-ablated"),
    ):
        ax.imshow(sampling.image_grid(images), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(label, fontsize=10)
    return fig


def _harm_order(effect: np.ndarray) -> np.ndarray:
    """Rows 1.. of `effect` [M, K], most harmful first: by the effect on RANK_METRIC, ties by the effect on overall."""
    rows = effect[1:]
    return 1 + np.lexsort((rows[:, METRICS.index("overall")], rows[:, METRICS.index(RANK_METRIC)]))


def _fmt_effect(result: dict, row: int, metric: str, low: str = "ci_low", high: str = "ci_high") -> str:
    k = METRICS.index(metric)
    effect, low, high = (100 * result[name][row, k] for name in ("effect", low, high))
    return f"{effect:+.1f} [{low:+.1f}, {high:+.1f}]"


def run(
    model: context.AnalysisModel,
    out_dir,
    *,
    captions: Sequence[str] | None = None,
    images_per_prompt: int = 4,
    mode: str = "zero",
    top_heads: Sequence | None = None,
    chunk: int = 8,
) -> epath.Path:
    """Single-head ablation screen of every attention head ("zero", "mean" or "both"), plus the
    `top_heads` set vs random sets of its size when given; writes `<out_dir>/ablation/` (context.write_report) and
    returns that directory. `captions` (default: the config's eval prompts) are each sampled `images_per_prompt`
    times, every one from its own noise."""
    modes = ("zero", "mean") if mode == "both" else (mode,)
    for m in modes:
        if m not in MASK_KEYS:
            raise ValueError(f"Unknown ablation mode {mode!r}; use 'zero', 'mean' or 'both'.")
    prompts = list(captions) if captions is not None else evaluate.eval_prompt_list(model.config)
    captions = [c for c in prompts for _ in range(images_per_prompt)]
    cfg = model.model_cfg
    depth, heads, kinds = cfg.depth, cfg.num_heads, interventions.head_kinds(cfg)
    masks = single_head_masks(depth, heads, kinds)
    labels = single_head_labels(depth, heads, kinds)
    arrays = {"masks": masks, "captions": np.array(captions), "metrics": np.array(METRICS)}
    arrays["heads"] = np.array([(kinds.index(k), layer, head) for k, layer, head in labels], np.int32)
    figures = {}
    lines = [
        f"# Head ablation: {model.label}",
        "",
        f"Every attention head ({depth} layers x {heads} heads of {' and '.join(kinds)} attention: {len(labels)} "
        f"heads) ablated alone ({', '.join(modes)} ablation), {len(prompts)} prompts x {images_per_prompt} images = "
        f"{len(captions)} images per mask, the same noises for every mask (paired). Sampler: "
        f"{sampling.describe_eval_sampler(model.config)}. Zero "
        "ablation multiplies the head's output by 0; mean ablation replaces it at each position by its mean over the "
        "batch of the same solver step, each CFG half apart. Effect = accuracy with "
        "the head ablated - baseline accuracy, in percentage points, with 95 % paired cluster bootstrap intervals "
        f"({NUM_RESAMPLES} resamples of the prompts, each with all its images).",
        "",
    ]
    timing = []
    for m in modes:
        start = time.perf_counter()
        images, times = _screen(model, captions, masks, mode=m, chunk=chunk)
        result = effects(images, captions, shape=masks.shape[1:])
        score_s = time.perf_counter() - start - times["compile_s"] - times["run_s"]
        timing.append(
            f"{m}: compile {times['compile_s']:.1f} s, sampling {times['run_s']:.1f} s ({len(masks)} masks), "
            f"scoring {score_s:.1f} s"
        )
        for name, value in result.items():
            arrays[f"{name}_{m}"] = value
        figures[f"effect_map_{m}"] = effect_map_figure(result["effect_map"], m, model.label, kinds)
        order = _harm_order(result["effect"])
        if m == modes[0]:
            lines += ["## Baseline accuracy (no ablation)", "", "| " + " | ".join(METRICS) + " |"]
            lines += ["|---" * len(METRICS) + "|"]
            lines += ["| " + " | ".join(f"{100 * a:.1f}" for a in result["accuracy"][0]) + " |", ""]
            shown = np.linspace(0, len(captions) - 1, min(GRID_IMAGES, len(captions))).round().astype(int)
            figures["sample_grid"] = sample_grid_figure(
                images[0, shown], images[order[0], shown], labels[order[0] - 1], m, model.label
            )
        lines += [
            f"## The 5 most harmful heads, {m} ablation (ranked by {RANK_METRIC})",
            "",
            f"Picked as the most harmful of {len(labels)}, a head's own 95 % interval is too optimistic; the last "
            f"column is simultaneous over all {len(labels)} heads (studentized max over the same resamples).",
            "",
            "| head | "
            + " | ".join(f"{metric} effect [95 % CI]" for metric in REPORT_METRICS)
            + f" | {RANK_METRIC} [simultaneous 95 %] |",
            "|---" * (2 + len(REPORT_METRICS)) + "|",
        ]
        for row in order[:5]:
            kind, layer, head = labels[row - 1]
            cells = " | ".join(_fmt_effect(result, row, metric) for metric in REPORT_METRICS)
            simultaneous = _fmt_effect(result, row, RANK_METRIC, "sim_low", "sim_high")
            lines.append(f"| {kind} L{layer} H{head} | {cells} | {simultaneous} |")
        lines.append("")
        if top_heads:
            comparison = set_vs_random(model, captions, top_heads, mode=m, chunk=chunk)
            arrays[f"set_masks_{m}"] = comparison["masks"]
            for name in ("accuracy", "effect", "ci_low", "ci_high"):
                arrays[f"set_{name}_{m}"] = comparison["effects"][name]
            chosen = ", ".join(f"{kind} L{layer} H{head}" for kind, layer, head in comparison["sets"][0])
            lines += [
                f"## Chosen heads ablated together vs {len(comparison['sets']) - 1} random sets, {m} ablation",
                "",
                f"Chosen: {chosen}. Random sets have the same size and kinds (without the chosen heads when possible).",
                "",
                "| metric | chosen [95 % CI] | random mean | random min | random max | random sets as harmful |",
                "|---|---|---|---|---|---|",
            ]
            for metric, c in comparison["comparison"].items():
                lines.append(
                    f"| {metric} | {100 * c['chosen']:+.1f} [{100 * c['chosen_ci'][0]:+.1f}, "
                    f"{100 * c['chosen_ci'][1]:+.1f}] | {100 * c['random_mean']:+.1f} | {100 * c['random_min']:+.1f} "
                    f"| {100 * c['random_max']:+.1f} | {100 * c['fraction_random_as_harmful']:.0f} % |"
                )
            lines.append("")
    lines += ["## Wall time", "", *(f"- {t}" for t in timing), ""]
    directory = context.write_report(out_dir, "ablation", arrays, figures, "\n".join(lines))
    logging.info("Wrote the head-ablation report to %s.", directory)
    return directory
