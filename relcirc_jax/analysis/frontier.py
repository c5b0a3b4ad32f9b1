"""The accuracy-vs-diversity study (`--config.analysis.kind=diversity`; notes 7.2-7.3): contextual repulsion
against the CFG sweep, interval guidance, latent particle guidance, CADS and image-token repulsion, on paired seeds.

Protocol, fixed before looking (the grid is `GRIDS[config.analysis.diversity_grid]`): `diversity_prompts` eval
prompts, each sampled as `diversity_groups` groups of `diversity_group_size` images; image i starts from noise i
under every method and knob (paired). Each method compiles once and runs its whole knob sweep through one
vmapped sampler (analysis/interventions.py). Every image is scored by the evaluator; per knob setting:

    accuracy     fraction of images the evaluator passes (`diversity_metric`, "overall" = colours, shapes, unique
                 binding and the strict relation; "unique_binding" = both objects drawn once each, for a model that
                 has not learned the relation yet)
    VS_m         mean Vendi (layout RBF kernel, sigma 0.1 of the canvas) over size-m subsets of each group's
                 correct images (m pre-registered: 3 for B = 4, 4 for B = 8; `diversity_m`), averaged over a prompt's
                 sufficient groups, then over prompts (diversity at a fixed count, apart from accuracy; primary)
    ENC          Vendi of each group's correct layouts, 0 when none (accuracy and diversity in one number)
    pixel Vendi  cosine Vendi of 32x32 pixels over all images of a group (a cross-check, not layout-specific)
    MMD^2, coverage  per prompt, of its correct layouts against REFERENCE_LAYOUTS evaluator-correct layouts of the
                 generator's law for that prompt, averaged over prompts (marginal_fidelity; coverage at a fixed
                 COVERAGE_POINTS generated layouts, so that it does not grow with accuracy)
    ms/image     sampling wall time per image of the method's sweep (a vmapped sweep computes every branch, so
                 it bounds a single setting's cost from above)

with 95 % bootstrap intervals over prompts. The reference point is the generator's law measured as a method is
(`reference`): exact renders of it, scored by the same evaluator, so its accuracy is that of a perfect model (< 1
where objects overlap). The question the report answers: at equal accuracy, does contextual repulsion reach a higher
VS_m than the CFG sweep and particle guidance? It is stated per point as the distance above the CFG frontier (the
piecewise-linear VS_m of the CFG sweep at the same accuracy), with a paired bootstrap interval (the same prompt
resamples for the setting and every CFG point); a setting counts as above or below only when it excludes 0.

Methods by model: "repulsion" (text stream) needs an MM-DiT; on the PixArt DiT "pseudo_repulsion" (the
pseudo-contextual analogue of notes 6.3 (A), labelled as such) runs in its place. "image_repulsion" is the
image-side control on both. The grid's ablations (VARIANTS: M = 10 inner steps, the attn_out site, the conditional
branch only, text and image streams together, and the token masks: relation words frozen, only the object words, only
the padding) run as "repulsion[M10]" and so on, each an eta sweep at one (tau, blocks) point. On the MM-DiT the
report ends with diagnostic D3 (repulsion_tokens.py): which caption tokens the method moves, by role.
"""

import time
import warnings

import numpy as np
from absl import logging

from relcirc_jax.analysis import context, diversity, interventions, repulsion_tokens
from relcirc_jax.analysis import repulsion as repulsion_lib
from relcirc_jax.analysis.bootstrap import resample_indices
from relcirc_jax.config import DIVERSITY_METRICS, diversity_m
from relcirc_jax.data.prompts import parse
from relcirc_jax.evaluation.scoring import score_specs
from relcirc_jax.models import arch
from relcirc_jax.train import evaluate, sampling

NUM_RESAMPLES = 1000
REFERENCE_GROUPS = 64  # groups of the generator's law rendered per prompt for the reference point
REFERENCE_LAYOUTS = 64  # evaluator-correct reference layouts per prompt for MMD and coverage
COVERAGE_POINTS = 4  # correct layouts per prompt that coverage reads (a fixed count: see marginal_fidelity)

CADS_TAUS = ((0.3, 0.8), (0.6, 0.9))  # (tau1, tau2): the repulsion paper's and the flow_grpo defaults
# Ablations of the contextual repulsion (notes 7.3's M in {10, 50}; 7.4 D4's site, streams and CFG branches; D3's
# token masks: the relation words frozen, only the colour and shape words, only the padding): each a method
# "repulsion[NAME]" with RepulsionConfig fields overridden, swept over eta at one (tau, blocks) point. The attn_out
# site and the "both" target exist on the MM-DiT only. B = 8 is a run-level choice:
# --config.analysis.diversity_group_size=8.
VARIANTS = {
    "M10": dict(inner_steps=10),
    "attn_out": dict(site="attn_out"),
    "cond_only": dict(branches="cond"),
    "text_and_image": dict(target="both"),
    "no_relation": dict(token_mask="no_relation"),
    "objects": dict(token_mask="objects"),
    "padding": dict(token_mask="padding"),
}
GRIDS = {
    # notes 7.3
    "full": dict(
        cfg=(1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0),
        eta=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
        tau=(1, 2, 4),
        blocks=("all", "first", "middle", "last"),
        pg=(3.0, 10.0, 30.0, 100.0, 300.0),
        cads=[(s, *taus, psi) for s in (0.05, 0.1, 0.25, 0.5) for taus in CADS_TAUS for psi in (0.5, 1.0)],
        intervals=((0.0, 600.0), (200.0, 800.0), (400.0, 1000.0), (200.0, 1000.0)),
        variants=dict(names=tuple(VARIANTS), eta=(0.1, 0.2, 0.5), tau=2, blocks="all"),
    ),
    # the same axes, thinned for a CPU: about 30 settings
    "small": dict(
        cfg=(1.0, 2.0, 3.0, 4.5, 8.0),
        eta=(0.05, 0.2, 0.5, 1.0),
        tau=(2, 4),
        blocks=("all", "middle"),
        pg=(10.0, 30.0, 100.0),
        cads=[(0.1, 0.3, 0.8, 1.0), (0.25, 0.3, 0.8, 1.0), (0.5, 0.3, 0.8, 1.0)],
        intervals=((200.0, 800.0), (400.0, 1000.0)),
        variants=dict(names=("M10", "attn_out", "no_relation"), eta=(0.2, 0.5), tau=2, blocks="all"),
    ),
    # one or two settings per method, for tests
    "smoke": dict(
        cfg=(1.0, 4.5),
        eta=(0.5,),
        tau=(2,),
        blocks=("all",),
        pg=(30.0,),
        cads=[(0.25, 0.3, 0.8, 1.0)],
        intervals=((200.0, 800.0),),
        variants=dict(names=(), eta=(), tau=2, blocks="all"),
    ),
}


def methods(model: context.AnalysisModel, grid: dict, group_size: int) -> list[dict]:
    """[{"name", "labels" (one per setting), "knobs" ({interventions key: [M, ...]}), "generate" (generate_fn
    kwargs)}] for the model: every method of the grid that applies to its architecture."""
    eval_config, depth = model.config.eval, model.model_cfg.depth
    window = lambda tau: repulsion_lib.first_steps_window(eval_config.solver, eval_config.num_steps, tau)  # noqa: E731
    thirds = repulsion_lib.thirds(depth)
    out = [
        dict(name="cfg", labels=[f"w={w:g}" for w in grid["cfg"]], knobs={"cfg_scale": np.float32(grid["cfg"])}),
        dict(
            name="interval",
            labels=[f"CFG {eval_config.cfg_scale:g} in t [{lo:g}, {hi:g}]" for lo, hi in grid["intervals"]],
            knobs={"guidance_window": np.float32(grid["intervals"])},
        ),
        dict(name="pg", labels=[f"coeff={c:g}" for c in grid["pg"]], knobs={"pg_coeff": np.float32(grid["pg"])}),
        dict(
            name="cads",
            labels=[f"s={s:g} tau=({t1:g},{t2:g}) psi={p:g}" for s, t1, t2, p in grid["cads"]],
            knobs={"cads": np.float32(grid["cads"])},
        ),
    ]

    def sweep(blocks_of):
        """eta 0 first (it must equal CFG at the eval scale: a check), then window-major, so that a chunk of the
        vmapped screen mostly shares one window and skips the work outside it; block sets the depth allows."""
        blocks = [b for b in grid["blocks"] if b in blocks_of]
        return [(0.0, grid["tau"][0], "all")] + [
            (e, tau, b) for tau in grid["tau"] for b in blocks for e in grid["eta"]
        ]

    def repulsion_method(name, blocks_of, settings=None, **fields):
        settings = sweep(blocks_of) if settings is None else settings
        knobs = [repulsion_lib.knobs(e, window(tau), blocks_of[b]) for e, tau, b in settings]
        config = repulsion_lib.RepulsionConfig(**fields)
        return dict(
            name=name,
            labels=[f"eta={e:g} tau={tau} blocks={b}" for e, tau, b in settings],
            knobs={k: np.stack([row[k] for row in knobs]) for k in repulsion_lib.KNOBS},
            generate=dict(repulsion=config),
        )

    mmdit = arch.arch_of(model.model_cfg) == "mmdit"
    # on the PixArt DiT, notes 6.3 (A): an analogue, not the paper's method
    contextual, target = ("repulsion", "text") if mmdit else ("pseudo_repulsion", "pseudo_text")
    out.append(repulsion_method(contextual, thirds, target=target))
    ablation = grid["variants"]
    for variant in ablation["names"]:
        overrides = VARIANTS[variant]
        if not mmdit and (overrides.get("site", "block_out") != "block_out" or overrides.get("target") == "both"):
            continue  # the PixArt DiT repels one stream, at block_out
        point = [(e, ablation["tau"], ablation["blocks"]) for e in ablation["eta"]]
        out.append(repulsion_method(f"{contextual}[{variant}]", thirds, point, **{"target": target, **overrides}))
    out.append(repulsion_method("image_repulsion", repulsion_lib.thirds(depth, text=False), target="image"))
    for method in out:
        method.setdefault("generate", {})
        method["generate"]["group_size"] = group_size
    return out


def bootstrap(per_prompt: np.ndarray, num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the nan-mean of per_prompt [P] over prompt resamples (NaN entries skipped)."""
    values = np.asarray(per_prompt, np.float64)
    return _interval(_nanmean(values[resample_indices(len(values), num_resamples, seed)], axis=1))


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the finite samples (NaN, NaN when none is)."""
    finite = samples[np.isfinite(samples)]
    if not finite.size:
        return float("nan"), float("nan")
    return float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without the warning for all-NaN slices (they stay NaN: e.g. a prompt with no sufficient group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def point_metrics(images, scores, specs, prompts: int, groups: int, group_size: int, metric: str, m: int = 0) -> dict:
    """The metrics of one setting: images uint8 [N, H, W, 3] and their scores (N = prompts x groups x group_size,
    prompt-major); m = VS_m's subset size (0: the pre-registered one, config.diversity_m). Accuracy and VS_m are
    means over prompts of per-prompt values ("accuracy_prompt", "vs_m_prompt"; a prompt's VS_m is the mean over its
    sufficient groups), the estimands of their bootstrap intervals; "correct_layouts" holds each prompt's correct
    layouts (for marginal_fidelity)."""
    size = images.shape[1]
    features, _, correct = diversity.layouts_from_scores(scores, size, metric=metric, specs=specs)
    shape = (prompts * groups, group_size)
    features, correct = features.reshape(shape + (4,)), correct.reshape(shape)
    vs = diversity.matched_size_vendi(features, correct, diversity_m(group_size, m)).reshape(prompts, groups)
    enc = diversity.effective_number_of_layouts(features, correct).reshape(prompts, groups)
    pixels = diversity.pixel_features(images).reshape(shape + (-1,))
    pixel_vendi = np.array([float(diversity.vendi_score(group)) for group in pixels])
    accuracy = correct.reshape(prompts, -1).mean(1)
    vs_prompt = _nanmean(vs, axis=1)
    by_prompt = zip(features.reshape(prompts, -1, 4), correct.reshape(prompts, -1))
    return {
        "accuracy": float(accuracy.mean()),
        "accuracy_ci": bootstrap(accuracy),
        "accuracy_prompt": accuracy,
        "vs_m": float(_nanmean(vs_prompt, axis=0)),
        "vs_m_ci": bootstrap(vs_prompt),
        "vs_m_prompt": vs_prompt,
        "insufficient": float(1 - np.isfinite(vs).mean()),
        "enc": float(enc.mean()),
        "enc_ci": bootstrap(enc.mean(1)),
        "pixel_vendi": float(pixel_vendi.mean()),
        "correct_layouts": [f[c] for f, c in by_prompt],
    }


def marginal_fidelity(correct_layouts: list[np.ndarray], references: list[np.ndarray]) -> tuple[float, float]:
    """(MMD^2, coverage) of each prompt's correct layouts [n_p, 4] against that prompt's reference layouts, averaged
    over the prompts where they are defined (NaN when none is). MMD^2 (unbiased, so any n_p >= 2 estimates the same
    quantity) reads the prompts with >= 2 correct layouts. Coverage grows with the number of generated points, so it
    reads a fixed count, the first COVERAGE_POINTS correct layouts of the prompts that have as many: how much of the
    prompt's law that many samples reach, whatever the accuracy."""
    mmd = [diversity.mmd2(g, r) if len(g) >= 2 else np.nan for g, r in zip(correct_layouts, references)]
    cov = [
        diversity.knn_coverage(g[:COVERAGE_POINTS], r) if len(g) >= COVERAGE_POINTS else np.nan
        for g, r in zip(correct_layouts, references)
    ]
    return float(_nanmean(np.array(mmd), axis=0)), float(_nanmean(np.array(cov), axis=0))


def reference(prompt_list, group_size: int, size: int, radius: float, task: str, metric: str, m: int = 0) -> dict:
    """The generator's law measured as a method is: REFERENCE_GROUPS groups of group_size exact renders per prompt
    (diversity.reference_scenes), scored and summarised by point_metrics (so accuracy, VS_m^ref and ENC^ref are what
    a perfect model scores: accuracy < 1 where the objects overlap), and "layouts": per prompt, REFERENCE_LAYOUTS
    evaluator-correct layouts of an independent draw, the MMD / coverage reference; its own "mmd2" and "coverage"
    against them are the null values."""
    drawn = [
        diversity.reference_scenes(p, REFERENCE_GROUPS * group_size, seed=2 * i, size=size, radius=radius, task=task)
        for i, p in enumerate(prompt_list)
    ]
    images = np.concatenate([d[0] for d in drawn])
    specs = [spec for d in drawn for spec in d[1]]
    point = point_metrics(
        images, score_specs(images, specs), specs, len(prompt_list), REFERENCE_GROUPS, group_size, metric, m
    )
    layouts = [
        diversity.correct_reference_layouts(
            p, REFERENCE_LAYOUTS, seed=2 * i + 1, size=size, radius=radius, task=task, metric=metric
        )
        for i, p in enumerate(prompt_list)
    ]
    point["mmd2"], point["coverage"] = marginal_fidelity(point.pop("correct_layouts"), layouts)
    return {**point, "layouts": layouts}


def _interpolated_gap(acc, vs, cfg_acc, cfg_vs) -> np.ndarray:
    """vs [n] minus the CFG sweep's VS_m (points cfg_acc, cfg_vs [k]) interpolated at acc [n]; NaN outside the
    sweep's accuracy range, where vs is NaN, or when fewer than 2 CFG points have a VS_m."""
    usable = np.isfinite(cfg_vs)
    if usable.sum() < 2:
        return np.full(np.shape(acc), np.nan)
    order = np.lexsort((cfg_vs[usable], cfg_acc[usable]))
    xs, ys = cfg_acc[usable][order], cfg_vs[usable][order]
    inside = (acc >= xs[0]) & (acc <= xs[-1]) & np.isfinite(vs)
    return np.where(inside, vs - np.interp(acc, xs, ys), np.nan)


def frontier_gap(points: list[dict], cfg_points: list[dict]) -> list[float]:
    """VS_m of each point minus the CFG sweep's VS_m interpolated at the same accuracy (NaN outside its range)."""
    stats = lambda pts: (np.array([p["accuracy"] for p in pts]), np.array([p["vs_m"] for p in pts], np.float64))
    return [float(g) for g in _interpolated_gap(*stats(points), *stats(cfg_points))]


def gap_intervals(
    points: list[dict], cfg_points: list[dict], num_resamples: int = NUM_RESAMPLES, seed: int = 0
) -> list[tuple[float, float]]:
    """Paired 95 % bootstrap interval of each point's frontier_gap: every resample draws one set of prompt indices
    for the points and the whole CFG sweep alike (paired seeds, notes 7.3), recomputes each one's accuracy and
    VS_m (means over the drawn prompts), the interpolated frontier and the gap. Resamples in which a point falls
    outside the sweep's accuracy range are left out of its interval."""
    picks = resample_indices(len(cfg_points[0]["accuracy_prompt"]), num_resamples, seed)

    def resampled(pts):  # [len(pts), num_resamples] each
        acc = np.stack([p["accuracy_prompt"] for p in pts])[:, picks].mean(-1)
        return acc, _nanmean(np.stack([p["vs_m_prompt"] for p in pts])[:, picks], axis=-1)

    (acc, vs), (cfg_acc, cfg_vs) = resampled(points), resampled(cfg_points)
    gaps = np.stack([_interpolated_gap(acc[:, r], vs[:, r], cfg_acc[:, r], cfg_vs[:, r]) for r in range(num_resamples)])
    return [_interval(column) for column in gaps.T]


def run(
    model: context.AnalysisModel,
    out_dir,
    *,
    num_prompts: int = 16,
    groups: int = 2,
    group_size: int = 4,
    grid: str = "small",
    metric: str = "overall",
    m: int = 0,
    chunk: int = 8,
):
    """Runs the study (module docstring) and writes `<out_dir>/diversity/`; m: VS_m's subset size (0: the
    pre-registered one for group_size, config.diversity_m)."""
    if grid not in GRIDS:
        raise ValueError(f"Unknown diversity grid {grid!r}; choose one of {tuple(GRIDS)}.")
    if metric not in DIVERSITY_METRICS:
        raise ValueError(f"Unknown diversity metric {metric!r}; choose one of {DIVERSITY_METRICS}.")
    if group_size < 2:
        raise ValueError(f"diversity_group_size={group_size}: a group needs at least 2 images of a prompt.")
    m = diversity_m(group_size, m)
    config = model.config
    prompt_list = evaluate.eval_prompt_list(config)[:num_prompts]
    prompts = len(prompt_list)
    captions = [p for p in prompt_list for _ in range(groups * group_size)]
    specs = [parse(c).spec for c in captions]
    size = model.model_cfg.image_size
    ref = reference(prompt_list, group_size, size, config.data.radius, config.data.task, metric, m)
    results, images_by_method, timing = {}, {}, {}
    for method in methods(model, GRIDS[grid], group_size):
        name = method["name"]
        label = f"Diversity: {name}"
        images, times = interventions.screen(
            model, captions, method["knobs"], chunk=chunk, label=label, generate_kwargs=method["generate"]
        )
        start = time.perf_counter()
        flat = images.reshape((-1,) + images.shape[2:])
        scores = score_specs(flat, specs * len(images))
        per_setting = [
            {k: v[i * len(captions) : (i + 1) * len(captions)] for k, v in scores.items()} for i in range(len(images))
        ]
        points = [
            point_metrics(images[i], per_setting[i], specs, prompts, groups, group_size, metric, m)
            for i in range(len(images))
        ]
        for point in points:
            point["mmd2"], point["coverage"] = marginal_fidelity(point.pop("correct_layouts"), ref["layouts"])
        results[name] = dict(labels=method["labels"], points=points)
        images_by_method[name] = images
        timing[name] = dict(
            compile_s=times["compile_s"],
            run_s=times["run_s"],
            score_s=time.perf_counter() - start,
            ms_per_image=1000 * times["run_s"] / images.shape[0] / images.shape[1],
        )
        logging.info("Diversity %s: %d settings in %.1f s.", name, len(images), times["run_s"])
    checks = _paired_checks(images_by_method, results, config.eval.cfg_scale)
    for name, result in results.items():
        result["gap"] = frontier_gap(result["points"], results["cfg"]["points"])
        result["gap_ci"] = gap_intervals(result["points"], results["cfg"]["points"])
    arrays = _arrays(results, ref, timing)
    figures = {"frontier": _frontier_figure(results, ref, model.label, metric)}
    figures["sample_grid"] = _grid_figure(images_by_method, results, prompts, groups, group_size, model.label)
    summary = _summary(model, results, ref, timing, checks, prompts, groups, group_size, grid, metric, m)
    if arch.arch_of(model.model_cfg) == "mmdit":
        setting, moved = _token_moves(model, captions, GRIDS[grid], group_size)
        arrays.update({f"token_moves_{key}": value.astype(np.float32) for key, value in moved.items()})
        figures["token_moves"] = repulsion_tokens.figure(moved, model.label, setting)
        summary += "\n## Which caption tokens move (D3)\n\n" + "\n".join(repulsion_tokens.summary_lines(moved, setting))
    return context.write_report(out_dir, "diversity", arrays, figures, summary)


def _token_moves(model: context.AnalysisModel, captions, grid: dict, group_size: int) -> tuple[str, dict]:
    """Diagnostic D3 for the method's config at the ablations' (tau, blocks) point and the grid's largest eta:
    (that setting's label, repulsion_tokens.shares)."""
    eta, tau, blocks = max(grid["eta"]), grid["variants"]["tau"], grid["variants"]["blocks"]
    solver, steps = model.config.eval.solver, model.config.eval.num_steps
    knobs = repulsion_lib.knobs(
        eta, repulsion_lib.first_steps_window(solver, steps, tau), repulsion_lib.thirds(model.model_cfg.depth)[blocks]
    )
    _, moves, norms, tokens_per_role = repulsion_tokens.measure(
        model, captions, repulsion_lib.RepulsionConfig(), knobs, group_size
    )
    return f"eta={eta:g} tau={tau} blocks={blocks}", repulsion_tokens.shares(moves, norms, tokens_per_role)


def _paired_checks(images_by_method: dict, results: dict, eval_scale: float) -> list[str]:
    """Whether each repulsion's eta = 0 row reproduced CFG at the eval scale image for image. It does bit for bit
    when both sweeps run in chunks of the same size; otherwise the batched matmuls' shapes differ and so does their
    float rounding, which moves the odd pixel by a level or so."""
    cfg_labels = results["cfg"]["labels"]
    base_label = f"w={eval_scale:g}"
    if base_label not in cfg_labels:
        return []
    base = images_by_method["cfg"][cfg_labels.index(base_label)]
    lines = []
    for name in ("repulsion", "pseudo_repulsion", "image_repulsion"):
        if name in images_by_method:
            diff = np.abs(images_by_method[name][0].astype(np.int32) - base.astype(np.int32))
            verdict = (
                "identical images"
                if not diff.any()
                else (
                    f"{100 * (diff > 0).mean():.2f} % of pixel values differ (max {diff.max()} levels; chunk shapes "
                    "differ, see _paired_checks)"
                )
            )
            lines.append(f"{name} at eta 0 vs CFG {eval_scale:g}: {verdict}")
    return lines


POINT_KEYS = ("accuracy", "vs_m", "enc", "pixel_vendi", "mmd2", "coverage", "insufficient")
CI_KEYS = ("accuracy_ci", "vs_m_ci", "enc_ci")


def _arrays(results: dict, ref: dict, timing: dict) -> dict[str, np.ndarray]:
    arrays = {f"reference_{key}": np.float32(ref[key]) for key in POINT_KEYS}
    arrays.update({f"reference_{key}": np.float32(ref[key]) for key in CI_KEYS})
    for name, result in results.items():
        arrays[f"{name}_labels"] = np.array(result["labels"])
        for key in POINT_KEYS + CI_KEYS:
            arrays[f"{name}_{key}"] = np.array([p[key] for p in result["points"]], np.float32)
        arrays[f"{name}_gap"] = np.array(result["gap"], np.float32)
        arrays[f"{name}_gap_ci"] = np.array(result["gap_ci"], np.float32)
        arrays[f"{name}_ms_per_image"] = np.float32(timing[name]["ms_per_image"])
    return arrays


def _frontier_figure(results: dict, ref: dict, label: str, metric: str):
    plt = context.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key in ((axes[0], "vs_m"), (axes[1], "enc")):
        for name, result in results.items():
            pts = result["points"]
            x = np.array([p["accuracy"] for p in pts])
            y = np.array([p[key] for p in pts])
            xerr = np.abs(np.array([p["accuracy_ci"] for p in pts]).T - x)
            yerr = np.abs(np.array([p[f"{key}_ci"] for p in pts]).T - y)
            order = np.argsort(x)
            ax.errorbar(
                x[order], y[order], xerr=np.nan_to_num(xerr[:, order]), yerr=np.nan_to_num(yerr[:, order]),
                marker="o", ms=4, capsize=2, lw=1, label=name,
            )  # fmt: skip
        ax.scatter([ref["accuracy"]], [ref[key]], marker="*", s=160, c="k", zorder=5, label="generator's law, scored")
        ax.set_xlabel(f"accuracy ({metric})")
        ax.set_ylabel("VS_m (layouts, correct images)" if key == "vs_m" else "ENC (effective correct layouts)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Accuracy vs layout diversity: {label} (95 % bootstrap CIs over prompts)")
    fig.tight_layout()
    return fig


def _grid_figure(images_by_method, results, prompts, groups, group_size, label):
    """The first group of up to 4 prompts: CFG at the eval scale vs each method's most diverse setting."""
    plt = context.pyplot()
    rows = []
    for name, result in results.items():
        vs = np.array([p["pixel_vendi"] for p in result["points"]])
        pick = int(np.nanargmax(vs))
        rows.append((f"{name}\n{result['labels'][pick]}", images_by_method[name][pick]))
    shown = min(prompts, 4)
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * shown * group_size, 1.3 * len(rows)), squeeze=False)
    for ax, (title, images) in zip(axes[:, 0], rows):
        tiles = [images[p * groups * group_size + i] for p in range(shown) for i in range(group_size)]
        ax.imshow(np.concatenate(tiles, axis=1))
        ax.set_title(title, fontsize=7, loc="left")
        ax.axis("off")
    fig.suptitle(f"{label}: one group of {group_size} per prompt, the most pixel-diverse setting of each method")
    fig.tight_layout()
    return fig


def _fmt(value: float, ci=None, scale: float = 1.0, digits: int = 2) -> str:
    if not np.isfinite(value):
        return "n/a"
    text = f"{scale * value:.{digits}f}"
    if ci is not None and np.isfinite(ci[0]):
        text += f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"
    return text


def _row(name: str, label: str, point: dict, gap: float = float("nan"), gap_ci=None) -> str:
    return (
        f"| {name} | {label} | {_fmt(point['accuracy'], point['accuracy_ci'], 100, 1)} | "
        f"{_fmt(point['vs_m'], point['vs_m_ci'])} | {_fmt(gap, gap_ci)} | {_fmt(point['enc'], point['enc_ci'])} | "
        f"{_fmt(point['pixel_vendi'])} | {_fmt(point['mmd2'], digits=3)} | {_fmt(point['coverage'])} | "
        f"{_fmt(point['insufficient'], scale=100, digits=0)} % |"
    )


def _summary(model, results, ref, timing, checks, prompts, groups, group_size, grid, metric, m) -> str:
    lines = [
        f"# Accuracy vs diversity: {model.label}",
        "",
        f"{prompts} prompts x {groups} groups x {group_size} images per setting, the same noises for every setting "
        f'(paired); grid "{grid}"; sampler {sampling.describe_eval_sampler(model.config)}. Accuracy: "{metric}". '
        f"VS_m: m = {m}, layout RBF kernel sigma {diversity.LAYOUT_SIGMA}, the mean over prompts of each prompt's "
        "mean over its sufficient groups. MMD^2 and coverage: per prompt, against "
        f"{REFERENCE_LAYOUTS} evaluator-correct layouts of the generator's law for that prompt, averaged over "
        f"prompts (MMD^2 where >= 2 images are correct; coverage at a fixed {COVERAGE_POINTS} correct images, so "
        "that it does not grow with accuracy). The generator's law (first row): "
        f"{REFERENCE_GROUPS} groups per prompt of exact renders, scored by the same evaluator (what a perfect model "
        "scores). \"vs CFG\": VS_m minus the CFG sweep's VS_m at the same accuracy (n/a outside the sweep's accuracy "
        "range), with a paired 95 % bootstrap interval (the same prompt resamples for the setting and the sweep). "
        "Other intervals: 95 % bootstrap over prompts.",
        "",
    ]
    lines += [f"- {line}" for line in checks] + ([""] if checks else [])
    lines += [
        "| method | setting | accuracy % | VS_m | vs CFG | ENC | pixel Vendi | MMD^2 | coverage | insufficient |",
        "|---|---|---|---|---|---|---|---|---|---|",
        _row("generator's law", "rendered, scored", ref),
    ]
    for name, result in results.items():
        for label, point, gap, gap_ci in zip(result["labels"], result["points"], result["gap"], result["gap_ci"]):
            lines.append(_row(name, label, point, gap, gap_ci))
    base_ms = timing["cfg"]["ms_per_image"]
    lines += ["", "## Wall time", "", "| method | compile s | sampling ms / image | vs CFG sweep | scoring s |"]
    lines += ["|---|---|---|---|---|"]
    for name, t in timing.items():
        lines.append(
            f"| {name} | {t['compile_s']:.1f} | {t['ms_per_image']:.2f} | x{t['ms_per_image'] / base_ms:.2f} | "
            f"{t['score_s']:.1f} |"
        )
    lines += ["", "## What the data says", ""] + _verdict(results) + _enc_verdict(results)
    return "\n".join(lines) + "\n"


def _enc_verdict(results: dict) -> list[str]:
    """Each method's best ENC (accuracy and diversity in one number) against the CFG sweep's best, with CIs."""

    def best(name):
        points = results[name]["points"]
        i = int(np.argmax([p["enc"] for p in points]))
        return results[name]["labels"][i], points[i]

    cfg_label, cfg_point = best("cfg")
    out = [f"- ENC: the CFG sweep's best is {_fmt(cfg_point['enc'], cfg_point['enc_ci'])} ({cfg_label})."]
    for name in results:
        if name != "cfg":
            label, point = best(name)
            out.append(f"- ENC: {name}'s best is {_fmt(point['enc'], point['enc_ci'])} ({label}).")
    return out


def _verdict(results: dict) -> list[str]:
    """Per method: its best gap to the CFG frontier, and how many settings lie above or below it (paired 95 %
    interval excluding 0) of those comparable (inside the sweep's accuracy range, VS_m defined)."""
    out = []
    for name in ("repulsion", "pseudo_repulsion", "image_repulsion", "pg", "cads", "interval"):
        if name not in results:
            continue
        gaps = np.array(results[name]["gap"], np.float64)
        low, high = np.array(results[name]["gap_ci"], np.float64).reshape(-1, 2).T
        comparable = np.isfinite(gaps)
        if not comparable.any():
            out.append(f"- {name}: no setting falls inside the CFG sweep's accuracy range with a defined VS_m.")
            continue
        best = int(np.nanargmax(gaps))
        point = results[name]["points"][best]
        above, below = int(np.sum(comparable & (low > 0))), int(np.sum(comparable & (high < 0)))
        out.append(
            f"- {name}: best {results[name]['labels'][best]}: VS_m {point['vs_m']:.2f} at accuracy "
            f"{100 * point['accuracy']:.1f} %, {_fmt(gaps[best], results[name]['gap_ci'][best], digits=3)} against "
            f"the CFG sweep at that accuracy; of {int(comparable.sum())} comparable settings {above} lie above it and "
            f"{below} below (paired 95 % interval excluding 0), the rest within noise."
        )
    return out
