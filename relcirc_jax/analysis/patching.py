"""Activation patching: which heads and residual streams carry a corrupted prompt's effect into a clean sample.

Two worlds share every sampling batch: rows [0, N) sample the clean captions and rows [N, 2N) their corrupted twins
(CORRUPTIONS: the relation swapped for its converse, "above" <-> "below", or the two shapes swapped), pair i from the
same noise. A patch config says which activation of the corrupted twin replaces the clean row's own: one head's
output z ([layer, head]: a PixArt DiT's self- or cross-attention, an MM-DiT's joint attention, whose head patch
replaces the head's output at text and image queries alike) or the residual stream entering one block ([layer]; in an
MM-DiT both streams), at the solver steps of one window (models/dit.py and mmdit.py `*_head_patch`, `resid_patch`,
`patch_window`, read along `patch_source`). The corrupted rows are their own source, so they stay unpatched. Every
config of a screen runs through one compiled `vmap(generate)` (analysis/interventions.py), `chunk` configs per call.

Scores per config, over the N clean-world images:
  transfer   the share of the clean -> corrupted image change that the patch reproduces,
             sum <patched - clean, corrupted - clean> / sum |corrupted - clean|^2 over pixels and pairs
             (1: the patched sample is the corrupted one; 0: no effect), with a 95 % cluster bootstrap interval
             over prompts (the pairs of one clean caption are resampled together);
  accuracy   the evaluator's accuracy of the patched images against the clean and against the corrupted captions.
"""

import time
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from relcirc_jax import diffusion
from relcirc_jax.analysis import bootstrap, context, interventions
from relcirc_jax.config import PATCHING_CORRUPTIONS as CORRUPTIONS
from relcirc_jax.data import prompts
from relcirc_jax.data.spec import CONVERSE
from relcirc_jax.models import arch
from relcirc_jax.train import evaluate, sampling

KIND = "patching"
# Head outputs of self- / cross-attention (PixArt) or of joint attention (MM-DiT), the residual stream entering a
# block; "sites" in patching.npz index this tuple.
SITES = ("self", "cross", "resid", "joint")
PIXART_SITES = interventions.HEAD_KINDS["pixart"] + ("resid",)
TITLES = {"self": "self-attention head", "cross": "cross-attention head", "joint": "joint-attention head"}
SCORE_METRIC = "spatial_relationship"
NUM_RESAMPLES = 1000
TOP_SITES = 5

Site = tuple[str, int, int, int]  # (site, layer, head (-1 for resid), window index)


def corrupt(caption: str, corruption: str) -> str:
    """The corrupted twin of a caption, in the same template and phrasing: "relation" swaps the relation for its
    converse (the objects trade places), "shapes" swaps the two objects' shapes (ValueError when they are equal)."""
    parsed = prompts.parse(caption)
    spec = parsed.spec
    if corruption == "relation":
        spec = spec._replace(relation=CONVERSE[spec.relation])
    elif corruption == "shapes":
        if spec.shape1 == spec.shape2:
            raise ValueError(f"Caption {caption!r} has two {spec.shape1}s: swapping its shapes changes nothing.")
        spec = spec._replace(shape1=spec.shape2, shape2=spec.shape1)
    else:
        raise ValueError(f"Unknown corruption {corruption!r}; use one of {CORRUPTIONS}.")
    return prompts.caption(spec, phrasing=parsed.phrasing, template=parsed.template)


def step_windows(num_steps: int, num_windows: int) -> list[tuple[int, int]]:
    """Windows of solver steps (first, last), inclusive: all steps, then `num_windows` consecutive near-equal parts
    (early = high noise first); just the first when num_windows is 1."""
    if not 1 <= num_windows <= num_steps:
        raise ValueError(f"num_windows={num_windows} must be in [1, num_steps={num_steps}].")
    bounds = np.linspace(0, num_steps, num_windows + 1).round().astype(int)
    parts = [(int(a), int(b) - 1) for a, b in zip(bounds[:-1], bounds[1:])]
    return [(0, num_steps - 1)] + (parts if num_windows > 1 else [])


def model_sites(model_cfg: arch.ModelConfig) -> tuple[str, ...]:
    """The sites a model can patch: its kinds of head (interventions.head_kinds), then "resid"."""
    return interventions.head_kinds(model_cfg) + ("resid",)


def patch_configs(
    depth: int,
    heads: int,
    windows: Sequence[tuple[int, int]],
    timesteps: np.ndarray,
    sites: Sequence[str] = PIXART_SITES,
) -> tuple[dict[str, np.ndarray], list[Site]]:
    """({"<kind>_head_patch" [M, depth, heads] per head site, "resid_patch" [M, depth], "patch_window" [M, 2]}, the
    site of rows 1...): row 0 patches nothing; then, window by window and site by site (`sites`, e.g. a PixArt DiT's
    self-attention heads, cross-attention heads and residual streams), every head or block's residual input alone.
    `timesteps` are the model's timestep at each solver step (diffusion.model_timesteps); a window (first, last)
    becomes the timestep range it covers."""
    labels = [
        (site, layer, head, w)
        for w in range(len(windows))
        for site in sites
        for layer in range(depth)
        for head in (range(heads) if site != "resid" else (-1,))
    ]
    num = 1 + len(labels)
    keys = {site: interventions.head_keyword(site, "patch") for site in sites if site != "resid"}
    arrays = {key: np.zeros((num, depth, heads), np.float32) for key in keys.values()}
    arrays["resid_patch"] = np.zeros((num, depth), np.float32)
    arrays["patch_window"] = np.zeros((num, 2), np.float32)
    arrays["patch_window"][0] = (timesteps.min(), timesteps.max())
    for row, (site, layer, head, w) in enumerate(labels, start=1):
        first, last = windows[w]
        arrays["patch_window"][row] = (timesteps[last], timesteps[first])  # timesteps descend over the steps
        if site == "resid":
            arrays["resid_patch"][row, layer] = 1.0
        else:
            arrays[keys[site]][row, layer, head] = 1.0
    return arrays, labels


def screen(
    model: context.AnalysisModel,
    clean: Sequence[str],
    corrupted: Sequence[str],
    configs: dict[str, np.ndarray],
    *,
    chunk: int = 8,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(clean-world images under each config uint8 [M, N, H, W, 3], the corrupted world's images [N, H, W, 3],
    {"compile_s", "run_s"}): pair i of `clean` and `corrupted` samples from noise i, the clean row patching from its
    twin."""
    clean, corrupted = list(clean), list(corrupted)
    if len(clean) != len(corrupted):
        raise ValueError(f"{len(clean)} clean captions but {len(corrupted)} corrupted ones; they come in pairs.")
    n = len(clean)
    pairs = np.arange(n, dtype=np.int32)
    images, times = interventions.screen(
        model,
        clean + corrupted,
        configs,
        chunk=chunk,
        noise_id=np.concatenate([pairs, pairs]),
        patch_source=np.concatenate([pairs + n, pairs + n]),
        label="Patching screen",
    )
    return images[:, :n], images[0, n:], times


def transfer(
    patched: np.ndarray, clean: np.ndarray, corrupted: np.ndarray, captions: Sequence[str], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """{"transfer", "ci_low", "ci_high"} [M] of patched images [M, N, ...] between the unpatched clean [N, ...] and
    corrupted [N, ...] images (module docstring), the interval from NUM_RESAMPLES cluster bootstrap resamples of the
    pairs (bootstrap.cluster_weights: the pairs with one of the N clean `captions` are drawn together); NaN when the
    clean and corrupted images are identical."""
    clean = clean.astype(np.float64).reshape(len(clean), -1)
    change = corrupted.astype(np.float64).reshape(len(corrupted), -1) - clean
    moved = patched.astype(np.float64).reshape(patched.shape[:2] + (-1,)) - clean
    numerator = np.einsum("mnp,np->mn", moved, change)  # [M, N]
    denominator = np.einsum("np,np->n", change, change)  # [N]
    if not denominator.sum():  # the model ignores the corruption: there is no effect to transfer
        nan = np.full(len(patched), np.nan)
        return {"transfer": nan, "ci_low": nan, "ci_high": nan}
    weights = bootstrap.cluster_weights(captions, NUM_RESAMPLES, seed)  # [R, N]
    resampled = (numerator @ weights.T) / np.maximum(weights @ denominator, 1e-12)  # [M, R]
    return {
        "transfer": numerator.sum(1) / denominator.sum(),
        "ci_low": np.percentile(resampled, 2.5, axis=1),
        "ci_high": np.percentile(resampled, 97.5, axis=1),
    }


def _head_sites(labels: Sequence[Site]) -> list[str]:
    """The head sites among `labels`, in order."""
    return list(dict.fromkeys(site for site, *_ in labels if site != "resid"))


def site_maps(values: np.ndarray, labels: Sequence[Site], depth: int, heads: int, num_windows: int) -> dict:
    """Rows 1... of a per-config array laid out as {head site (e.g. "self", "cross"): [W, depth, heads], "resid":
    [W, depth]}."""
    maps = {site: np.full((num_windows, depth, heads), np.nan) for site in _head_sites(labels)}
    maps["resid"] = np.full((num_windows, depth), np.nan)
    for value, (site, layer, head, w) in zip(values[1:], labels):
        if site == "resid":
            maps["resid"][w, layer] = value
        else:
            maps[site][w, layer, head] = value
    return maps


def _window_name(window: tuple[int, int]) -> str:
    return f"steps {window[0]}-{window[1]}"


def _window_timesteps(arrays: dict, labels: Sequence[Site], windows: Sequence[tuple[int, int]]) -> str:
    """Each window's solver steps and the model timesteps they cover (the npz's `patch_window` rows)."""
    names = []
    for w, window in enumerate(windows):
        row = next(row for row, site in enumerate(labels, start=1) if site[3] == w)  # every row of a window alike
        low, high = arrays["patch_window"][row]
        names.append(f"{_window_name(window)} = t {high:.0f}-{low:.0f}")
    return ", ".join(names)


def _transfer_figure(maps: dict, windows: Sequence[tuple[int, int]], label: str, corruption: str):
    """One row per window: each head site's [layer x head] transfer and the residual stream per layer."""
    plt = context.pyplot()
    head_sites = [site for site in maps if site != "resid"]
    depth, heads = maps[head_sites[0]].shape[1:]
    fig, axes = plt.subplots(
        len(windows),
        len(head_sites) + 1,
        figsize=(len(head_sites) * (2.4 + 0.55 * heads) + 2.2, len(windows) * (1.3 + 0.45 * depth)),
        squeeze=False,
        constrained_layout=True,
        gridspec_kw={"width_ratios": [heads] * len(head_sites) + [1]},
    )

    def limit(*arrays):
        values = np.abs(np.concatenate([a.ravel() for a in arrays]))
        return max(float(np.nanmax(values)) if np.isfinite(values).any() else 0.0, 0.05)

    # heads move a share of the effect, a residual stream can move all of it: one colour scale each
    head_limit = limit(*(maps[site] for site in head_sites))
    limits = {**{site: head_limit for site in head_sites}, "resid": limit(maps["resid"])}
    for row, window in enumerate(windows):
        panels = [(site, maps[site][row]) for site in head_sites] + [("resid", maps["resid"][row][:, None])]
        for col, (site, values) in enumerate(panels):
            ax = axes[row, col]
            im = ax.imshow(values, cmap="RdBu_r", vmin=-limits[site], vmax=limits[site], aspect="auto")
            context.annotate_cells(ax, im, values)
            title = TITLES.get(site, "residual")
            ax.set_title(f"{title}\n{_window_name(window)}", fontsize=8)
            ax.set_xticks(range(values.shape[1]) if site != "resid" else [])
            ax.set_yticks(range(depth))
            ax.set_ylabel("layer")
            if site == "resid" or col == len(head_sites) - 1:
                where = ax if site == "resid" else axes[row, : len(head_sites)].tolist()
                fig.colorbar(im, ax=where, shrink=0.8, label="transfer")
    fig.suptitle(
        f"{label}: patching from the {corruption}-corrupted prompt, share of its effect transferred", fontsize=9
    )
    return fig


def _sample_figure(clean: np.ndarray, corrupted: np.ndarray, patched: np.ndarray, site: str, label: str):
    plt = context.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), constrained_layout=True)
    for ax, images, title in ((axes[0], clean, "clean"), (axes[1], corrupted, "corrupted"), (axes[2], patched, site)):
        ax.imshow(sampling.image_grid(images), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(label, fontsize=10)
    return fig


def _site_name(site: Site, windows) -> str:
    kind, layer, head, w = site
    where = f"resid L{layer}" if kind == "resid" else f"{kind} L{layer} H{head}"
    return f"{where} ({_window_name(windows[w])})"


def _labels(arrays: dict) -> list[Site]:
    return [(SITES[s], int(layer), int(head), int(w)) for s, layer, head, w in arrays["sites"]]


def head_order(arrays: dict) -> np.ndarray:
    """Config rows of single heads (every head site and window), largest transfer first (NaN last)."""
    rows = np.array([1 + i for i, site in enumerate(_labels(arrays)) if site[0] != "resid"])
    return rows[np.argsort(-np.nan_to_num(arrays["transfer"][rows], nan=-np.inf), kind="stable")]


def summary(arrays: dict, label: str, sampler: str, corruption: str, images_per_prompt: int) -> str:
    """The markdown summary of a patching screen from its arrays (as run() writes them to patching.npz)."""
    labels, windows = _labels(arrays), [tuple(w) for w in arrays["windows"].tolist()]
    transfer, low, high = arrays["transfer"], arrays["ci_low"], arrays["ci_high"]
    against = {"clean": arrays["relation_vs_clean"], "corrupted": arrays["relation_vs_corrupted"]}
    head_sites = _head_sites(labels)
    n, (depth, heads) = len(arrays["captions_clean"]), arrays[f"transfer_{head_sites[0]}"].shape[1:]
    compile_s, run_s, score_s = arrays["seconds"]
    lines = [
        f"# Activation patching: {label}",
        "",
        f"{n} clean captions ({n // images_per_prompt} eval prompts x {images_per_prompt} images) and their "
        f"{corruption}-corrupted twins sampled side by side from the same noises ({sampler}). Each of the "
        f"{len(labels)} configs (and the unpatched row 0) patches one site of the clean sample from its twin: "
        + "".join(f"{depth * heads} {TITLES[site]}s, " for site in head_sites)
        + f"and {depth} residual streams (block inputs), in each of "
        f"{len(windows)} step windows ({_window_timesteps(arrays, labels, windows)}). Transfer = share of the clean "
        f"-> corrupted image change the patch reproduces (1 = the corrupted image); 95 % cluster bootstrap intervals "
        f"over the {n // images_per_prompt} prompts (each with its {images_per_prompt} pairs).",
        "",
        f"Unpatched: {SCORE_METRIC} accuracy {100 * against['clean'][0]:.1f} % against the clean captions; the "
        f"corrupted world scores {100 * float(arrays['corrupted_world_relation']):.1f} % against its own."
        + (
            " The clean and corrupted samples are identical (the model ignores the corruption)."
            if np.isnan(transfer[0])
            else ""
        ),
        "",
        f"## The {TOP_SITES} heads with the largest transfer",
        "",
        f"| head (window) | transfer [95 % CI] | {SCORE_METRIC} vs clean caption | vs corrupted caption |",
        "|---|---|---|---|",
    ]
    for row in head_order(arrays)[:TOP_SITES]:
        lines.append(
            f"| {_site_name(labels[row - 1], windows)} | {transfer[row]:.2f} [{low[row]:.2f}, {high[row]:.2f}] | "
            f"{100 * against['clean'][row]:.1f} % | {100 * against['corrupted'][row]:.1f} % |"
        )
    lines += [
        "",
        "## The residual stream entering each block (transfer)",
        "",
        "| window | " + " | ".join(f"L{layer}" for layer in range(depth)) + " |",
        "|---" * (depth + 1) + "|",
    ]
    for w, window in enumerate(windows):
        lines.append(
            f"| {_window_name(window)} | " + " | ".join(f"{v:.2f}" for v in arrays["transfer_resid"][w]) + " |"
        )
    lines += [
        "",
        "The residual stream is the sample's whole state: patched in the late steps, at any block, it hands over "
        "the corrupted sample itself; the early window shows from which block on the corrupted prompt's effect is in "
        "the stream.",
        "",
        "## Wall time",
        "",
        f"- compile {compile_s:.1f} s, sampling {run_s:.1f} s ({len(transfer)} configs x {2 * n} images), scoring "
        f"{score_s:.1f} s",
        "",
    ]
    return "\n".join(lines)


def run(
    model: context.AnalysisModel,
    out_dir,
    *,
    num_prompts: int = 16,
    images_per_prompt: int = 1,
    corruption: str = "relation",
    num_windows: int = 2,
    chunk: int = 8,
) -> epath.Path:
    """Patches every head and residual stream in every window from `num_prompts` eval prompts' corrupted twins
    (spread over the eval prompt set, each sampled `images_per_prompt` times); writes `<out_dir>/patching/`
    (context.write_report) and returns that directory."""
    cfg, eval_config = model.model_cfg, model.config.eval
    prompts_all = evaluate.eval_prompt_list(model.config)
    if corruption == "shapes":
        prompts_all = [c for c in prompts_all if prompts.parse(c).spec.shape1 != prompts.parse(c).spec.shape2]
    picks = np.linspace(0, len(prompts_all) - 1, min(num_prompts, len(prompts_all))).round().astype(int)
    clean = [prompts_all[i] for i in picks for _ in range(images_per_prompt)]
    corrupted = [corrupt(c, corruption) for c in clean]
    windows = step_windows(eval_config.num_steps, num_windows)
    timesteps = diffusion.model_timesteps(eval_config.solver, eval_config.num_steps)
    configs, labels = patch_configs(cfg.depth, cfg.num_heads, windows, timesteps, model_sites(cfg))
    start = time.perf_counter()
    patched, corrupted_images, times = screen(model, clean, corrupted, configs, chunk=chunk)
    result = transfer(patched, patched[0], corrupted_images, clean)
    flat = patched.reshape((-1,) + patched.shape[2:])
    against = {}
    for name, captions in (("clean", clean), ("corrupted", corrupted)):
        scores, _ = evaluate.score_images(flat, captions * len(patched), "relcirc")
        against[name] = scores[SCORE_METRIC].reshape(len(patched), len(clean)).mean(1)
    corrupted_scores, _ = evaluate.score_images(corrupted_images, corrupted, "relcirc")
    score_s = time.perf_counter() - start - times["compile_s"] - times["run_s"]
    logging.info("Patching: %d configs scored in %.1f s.", len(patched), score_s)

    maps = site_maps(result["transfer"], labels, cfg.depth, cfg.num_heads, len(windows))
    arrays = {
        "captions_clean": np.array(clean),
        "captions_corrupted": np.array(corrupted),
        "windows": np.array(windows, np.int32),
        "sites": np.array([(SITES.index(s), layer, head, w) for s, layer, head, w in labels], np.int32),
        "relation_vs_clean": against["clean"],
        "relation_vs_corrupted": against["corrupted"],
        "corrupted_world_relation": corrupted_scores[SCORE_METRIC].mean(),
        "seconds": np.array([times["compile_s"], times["run_s"], score_s]),
        **configs,
        **result,
        **{f"transfer_{site}": value for site, value in maps.items()},
    }
    best = head_order(arrays)[0]
    shown = np.linspace(0, len(clean) - 1, min(8, len(clean))).round().astype(int)
    figures = {
        "transfer_maps": _transfer_figure(maps, windows, model.label, corruption),
        "samples": _sample_figure(
            patched[0, shown],
            corrupted_images[shown],
            patched[best, shown],
            _site_name(labels[best - 1], windows),
            model.label,
        ),
    }
    sampler = sampling.describe_eval_sampler(model.config)
    lines = summary(arrays, model.label, sampler, corruption, images_per_prompt)
    directory = context.write_report(out_dir, KIND, arrays, figures, lines)
    logging.info("Wrote the patching report to %s.", directory)
    return directory
