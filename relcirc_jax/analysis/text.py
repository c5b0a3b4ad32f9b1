"""Text-side analyses (the paper's text-encoder section): what of the caption the DiT uses, and where it sits.

prompt ablation   every eval prompt rewritten (VARIANTS: relation words dropped or replaced by the opposite relation,
                  a shape word dropped, fillers "the" added, another phrasing) and sampled from the same noises as
                  the original (image i of every variant starts from noise i), scored against the scene each variant
                  asks for (replace_relation: the NEW relation, i.e. does the image follow the word?)
variance partition  fraction of the variance of pooled caption embeddings that each factor (shape1, colour1,
                  relation, shape2, colour2) explains on its own (one-way ANOVA R^2), and phrasing, which is nested in
                  relation (partition_r2), in the text encoder's output and after the DiT's caption projection
relation arithmetic  e(caption with `new`) - e(caption with `old`), averaged over caption pairs that differ only in
                  the relation, added to held-out `old` captions' embeddings: how often the images then show `new`

Ungrammatical variants (drop_relation, drop_shape1, drop_shape2) are fed to the sampler as word ids: the RTE
conditioners read only ids and mask. Cached encoders (T5, MiniLM) embed captions by their index in the grammar, so
they cannot embed ungrammatical text; for them those variants are skipped (NaN rows, with a logged warning).
"""

import itertools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from relcirc_jax import evaluation
from relcirc_jax.analysis import capture, groups
from relcirc_jax.analysis.context import AnalysisModel, pyplot, write_report
from relcirc_jax.data import prompts, tokenizer
from relcirc_jax.data.spec import COLORS, CONVERSE, SHAPES, SceneSpec
from relcirc_jax.evaluation.scoring import METRICS
from relcirc_jax.models import arch, dit
from relcirc_jax.text.conditioner import TextConditioner
from relcirc_jax.train import evaluate, sampling

VARIANTS = ("original", "drop_relation", "replace_relation", "drop_shape1", "drop_shape2", "filler", "synonym")
UNGRAMMATICAL = ("drop_relation", "drop_shape1", "drop_shape2")
FACTORS = ("shape1", "color1", "relation", "shape2", "color2", "phrasing")
POOLS = ("mean", "relation", "shape2")  # all valid tokens, the relation phrase's tokens, the shape2 word's tokens
SPACES = ("text_encoder", "caption_projection")
ARITHMETIC_PAIRS = (("above", "below"), ("left", "right"))
SHOWN_METRICS = ("color", "shape", "unique_binding", "spatial_relationship", "spatial_relationship_loose", "overall")
_RELATION_METRICS = ("spatial_relationship", "spatial_relationship_loose")
_RTE_KINDS = ("rte", "rte_nopos")


class Variant(NamedTuple):
    name: str
    captions: list[str]  # space-separated VOCAB words, grammatical or not
    specs: list[SceneSpec]  # the scene each caption is scored against


# --- 1. prompt ablations -------------------------------------------------------------------------------------------


def prompt_variants(captions: Sequence[str]) -> list[Variant]:
    """The VARIANTS of grammatical `captions`, each a Variant(name, captions, specs) in the captions' order:

    original          the caption; its spec
    drop_relation     without the relation phrase and the copula "is" ("red circle blue square"); original spec
    replace_relation  the converse relation (CONVERSE), same phrasing index and template; spec with the new relation
    drop_shape1/2     without object 1's / object 2's shape word ("red is above blue square"); original spec
    filler            "the" before both objects (template "the_both"); original spec
    synonym           the next phrasing of the same relation (PHRASINGS), same template; original spec
    """
    parsed = [prompts.parse(c) for c in captions]
    originals = [p.spec for p in parsed]
    replaced = [p.spec._replace(relation=CONVERSE[p.spec.relation]) for p in parsed]

    def rewrite(spec: SceneSpec, phrasing: int, template: str) -> str:
        return prompts.caption(spec, phrasing=phrasing % len(prompts.PHRASINGS[spec.relation]), template=template)

    def drop(predicate) -> list[str]:
        return [" ".join(w for w, r in zip(p.words, p.roles) if not predicate(w, r)) for p in parsed]

    return [
        Variant("original", [" ".join(p.words) for p in parsed], originals),
        Variant("drop_relation", drop(lambda w, r: r == "relation" or (r == "filler" and w == "is")), originals),
        Variant("replace_relation", [rewrite(s, p.phrasing, p.template) for s, p in zip(replaced, parsed)], replaced),
        Variant("drop_shape1", drop(lambda w, r: r == "shape1"), originals),
        Variant("drop_shape2", drop(lambda w, r: r == "shape2"), originals),
        Variant("filler", [rewrite(p.spec, p.phrasing, "the_both") for p in parsed], originals),
        Variant("synonym", [rewrite(p.spec, p.phrasing + 1, p.template) for p in parsed], originals),
    ]


def is_grammatical(caption: str) -> bool:
    try:
        prompts.caption_index(caption)
    except ValueError:
        return False
    return True


def text_fields(captions: Sequence[str]) -> dict[str, np.ndarray]:
    """caption_batch for any captions of VOCAB words: ids and mask from the tokenizer, caption_index the grammar's
    (EMPTY_CAPTION_INDEX for an ungrammatical caption: a cached encoder would embed it as the empty caption)."""
    ids, mask = tokenizer.encode(captions)
    index = [prompts.caption_index(c) if is_grammatical(c) else prompts.EMPTY_CAPTION_INDEX for c in captions]
    return {"ids": ids, "mask": mask, "caption_index": np.array(index, np.int32)}


class WordSampler:
    """The model's eval sampler fed word ids directly, so ungrammatical captions can be drawn: the sampler gets empty
    placeholder captions and extra_fields overwrites their text fields with text_fields(captions). One compiled
    function serves every call; image i starts from noise i in every call (paired variants)."""

    def __init__(self, model: AnalysisModel, batch_size: int):
        self._model = model
        self._fields: dict[str, np.ndarray] = {}
        self._sampler = sampling.eval_sampler(
            model.config,
            model.model_cfg,
            model.conditioner,
            model.mesh,
            model.param_sh,
            batch_size,
            extra_fields=self._extra_fields,
        )

    def _extra_fields(self, padded: Sequence[str]) -> dict[str, np.ndarray]:
        pad = len(padded) - len(self._fields["ids"])
        return {k: np.concatenate([v, v[-1:].repeat(pad, 0)]) for k, v in self._fields.items()}

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        self._fields = text_fields(captions)
        return self._sampler(self._model.params, self._model.tables, [""] * len(captions))


def _score(images: np.ndarray, spec_sets: Sequence[Sequence[SceneSpec]]) -> list[dict[str, np.ndarray]]:
    """Per-image metrics of `images` against each list of specs (one detection pass)."""
    detections = evaluation.detect_with("relcirc", images)
    return [
        evaluation.score_detections(detections, evaluation.encode_specs(list(specs)), size=images.shape[1])
        for specs in spec_sets
    ]


def _any_shape_scores(images: np.ndarray, specs: Sequence[SceneSpec], field: str) -> dict[str, np.ndarray]:
    """Metrics with `field` (shape1 or shape2) a wildcard: per image, the OR over every shape it could have."""
    scored = _score(images, [[s._replace(**{field: shape}) for s in specs] for shape in SHAPES])
    return {m: np.any([s[m] for s in scored], 0) for m in METRICS}


def _means(scores: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([np.mean(scores[m]) for m in METRICS], np.float64)


def prompt_ablation(
    model: AnalysisModel,
    captions: Sequence[str],
    images_per_prompt: int = 2,
    variants: Sequence[str] | None = None,
) -> dict:
    """Samples every variant of `captions` (images_per_prompt seeds each, paired noises) and scores it.

    Returns {"variants", "metrics", "accuracy" [V, METRICS] (against each variant's spec), "accuracy_any_shape"
    [V, METRICS] (drop_shape rows: the dropped shape a wildcard; other rows as accuracy), "replace_relation_old"
    [METRICS] (replace_relation's images against the ORIGINAL relation; NaN without that variant), "examples" [V]
    (the first caption of each variant), "num_images" (per variant), "seconds"}. Skipped variants are NaN rows.
    """
    start = time.perf_counter()
    chosen = [v for v in prompt_variants(captions) if variants is None or v.name in variants]
    cached = model.conditioner.name not in _RTE_KINDS

    def repeat(xs):
        return [x for x in xs for _ in range(images_per_prompt)]

    num = len(captions) * images_per_prompt
    sampler = WordSampler(model, min(num, model.config.eval.batch_size))
    accuracy = np.full((len(chosen), len(METRICS)), np.nan)
    any_shape = accuracy.copy()
    replace_old = np.full(len(METRICS), np.nan)
    for row, variant in enumerate(chosen):
        if cached and not all(is_grammatical(c) for c in variant.captions):
            logging.warning(
                "Text encoder %s embeds captions by their grammar index and cannot embed the ungrammatical "
                "variant %s (e.g. %r); skipping it.",
                model.conditioner.name,
                variant.name,
                variant.captions[0],
            )
            continue
        specs = repeat(variant.specs)
        images = sampler(repeat(variant.captions))
        spec_sets = [specs]
        if variant.name == "replace_relation":
            spec_sets.append(repeat([s._replace(relation=CONVERSE[s.relation]) for s in variant.specs]))
        scored = _score(images, spec_sets)
        accuracy[row] = _means(scored[0])
        any_shape[row] = accuracy[row]
        if variant.name in ("drop_shape1", "drop_shape2"):
            any_shape[row] = _means(_any_shape_scores(images, specs, variant.name.replace("drop_", "")))
        if variant.name == "replace_relation":
            replace_old = _means(scored[1])
    return {
        "variants": np.array([v.name for v in chosen]),
        "metrics": np.array(METRICS),
        "accuracy": accuracy,
        "accuracy_any_shape": any_shape,
        "replace_relation_old": replace_old,
        "examples": np.array([v.captions[0] for v in chosen]),
        "num_images": num,
        "seconds": time.perf_counter() - start,
    }


# --- 2. variance partition -----------------------------------------------------------------------------------------


def factor_r2(vectors: np.ndarray, labels: dict[str, Sequence]) -> dict[str, float]:
    """For each factor, the fraction of the total variance of `vectors` [N, D] its group means explain:
    sum_g n_g |mean_g - mean|^2 / sum_i |x_i - mean|^2 (one-way ANOVA R^2, each factor on its own)."""
    x = np.asarray(vectors, np.float64)
    centred = x - x.mean(0)
    total = float((centred**2).sum())
    out = {}
    for name, values in labels.items():
        _, group = np.unique(np.asarray(values, object).astype(str), return_inverse=True)
        one_hot = (group[None, :] == np.arange(group.max() + 1)[:, None]).astype(np.float64)  # [G, N]
        counts, sums = one_hot.sum(1), one_hot @ centred
        out[name] = float(((sums**2).sum(1) / counts).sum() / total) if total > 0 else 0.0
    return out


def partition_r2(vectors: np.ndarray, labels: dict[str, Sequence]) -> dict[str, float]:
    """factor_r2 of the FACTORS, except phrasing: a phrasing index names a different phrase for every relation (and
    left/right have 2), so phrasing is nested in relation, and its share is what the (relation, phrasing) cells
    explain beyond the relation alone. The design is balanced within each cell, so the shares add up."""
    cells = [f"{relation}|{phrasing}" for relation, phrasing in zip(labels["relation"], labels["phrasing"])]
    r2 = factor_r2(vectors, {**labels, "phrasing": cells})
    r2["phrasing"] -= r2["relation"]
    return r2


def partition_captions() -> tuple[list[str], dict[str, list]]:
    """Every "plain" caption with both colours named (specs x phrasings) and its factor labels."""
    captions, labels = [], {f: [] for f in FACTORS}
    for relation, phrases in prompts.PHRASINGS.items():
        for phrasing in range(len(phrases)):
            for c1, s1, c2, s2 in itertools.product(COLORS, SHAPES, COLORS, SHAPES):
                spec = SceneSpec(s1, c1, relation, s2, c2)
                captions.append(prompts.caption(spec, phrasing=phrasing))
                for field in FACTORS[:-1]:
                    labels[field].append(getattr(spec, field))
                labels["phrasing"].append(phrasing)
    return captions, labels


def embed(model: AnalysisModel, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(text float32[N, L, Dc], mask bool[N, L]): the text encoder's output for grammatical captions."""
    text, mask = model.conditioner.embed(model.tables, sampling.caption_batch(captions))
    return np.asarray(text, np.float32), np.asarray(mask, bool)


def project(model: AnalysisModel, text: np.ndarray, mask: np.ndarray, chunk: int = 256) -> np.ndarray:
    """float32[N, L, D]: the caption tokens after the DiT's caption projection (hook_caption)."""
    cfg = model.model_cfg

    @jax.jit
    def caption_tokens(params, text, mask):
        x, t = dit.example_inputs(cfg, text.shape[0])[:2]
        return arch.run_with_cache(cfg, params, x, t, text, mask, ["hook_caption"])[1]["hook_caption"]

    out = [
        np.asarray(caption_tokens(model.params, text[i : i + chunk], mask[i : i + chunk]), np.float32)
        for i in range(0, len(text), chunk)
    ]
    return np.concatenate(out)


def _pool(tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    weights = weights.astype(np.float32)
    pooled = np.einsum("nl,nld->nd", weights, tokens).astype(np.float64)
    return pooled / np.maximum(weights.sum(1, keepdims=True), 1e-9)


def variance_partition(model: AnalysisModel) -> dict:
    """R^2 of each factor (FACTORS, partition_r2) on the pooled embeddings of partition_captions(), before and after the
    caption projection: {"variance_partition" [2 spaces, factors] (mean over valid tokens), "r2" [pools, 2,
    factors], "factors", "pools", "spaces", "num_captions", "seconds"}."""
    start = time.perf_counter()
    captions, labels = partition_captions()
    text, mask = embed(model, captions)
    projected = project(model, text, mask)
    roles = groups.token_roles(model.conditioner, captions)
    weights = {
        "mean": mask,
        "relation": mask & (roles == groups.TEXT_ROLES.index("relation")),
        "shape2": mask & (roles == groups.TEXT_ROLES.index("shape2")),
    }
    r2 = np.zeros((len(POOLS), len(SPACES), len(FACTORS)))
    for p, pool in enumerate(POOLS):
        for s, tokens in enumerate((text, projected)):
            scores = partition_r2(_pool(tokens, weights[pool]), labels)
            r2[p, s] = [scores[f] for f in FACTORS]
    return {
        "variance_partition": r2[0],
        "r2": r2,
        "factors": np.array(FACTORS),
        "pools": np.array(POOLS),
        "spaces": np.array(SPACES),
        "num_captions": len(captions),
        "seconds": time.perf_counter() - start,
    }


# --- 3. relation vector arithmetic ---------------------------------------------------------------------------------


def edited_conditioner(conditioner: TextConditioner) -> TextConditioner:
    """`conditioner` with tables {"base": its tables, "delta": float[L, dim]}: embed adds delta to the valid tokens of
    every caption except the empty one (the CFG negative stays as it was)."""

    def edited_embed(tables, batch):
        text, mask = conditioner.embed(tables["base"], batch)
        edit = jnp.asarray(batch["caption_index"]) != prompts.EMPTY_CAPTION_INDEX
        keep = (mask & edit[:, None])[..., None]
        return text + (tables["delta"][None] * keep).astype(text.dtype), mask

    zeros = np.zeros((tokenizer.MAX_LEN, conditioner.dim), np.float32)
    return conditioner._replace(
        name=f"{conditioner.name}+delta", tables={"base": conditioner.tables, "delta": zeros}, embed=edited_embed
    )


def _pair_specs(relation: str) -> tuple[list[SceneSpec], list[SceneSpec]]:
    """(delta specs, held-out specs) with `relation`: held out are the paper's scenes (two colours, two shapes), the
    delta comes from the others (same colour or same shape)."""
    combinations = itertools.product(COLORS, SHAPES, COLORS, SHAPES)
    specs = [SceneSpec(s1, c1, relation, s2, c2) for c1, s1, c2, s2 in combinations]
    held_out = [s for s in specs if s.color1 != s.color2 and s.shape1 != s.shape2]
    return [s for s in specs if s not in held_out], held_out


def relation_delta(model: AnalysisModel, old: str, new: str) -> np.ndarray:
    """float32[L, dim]: mean over the delta specs of e(caption with `new`) - e(caption with `old`) (plain template,
    phrasing 0, so both captions' tokens line up)."""
    specs, _ = _pair_specs(old)
    old_text, old_mask = embed(model, [prompts.caption(s) for s in specs])
    new_text, new_mask = embed(model, [prompts.caption(s._replace(relation=new)) for s in specs])
    diff = new_text * new_mask[..., None] - old_text * old_mask[..., None]
    return diff.mean(0).astype(np.float32)


def relation_arithmetic(
    model: AnalysisModel,
    images_per_prompt: int = 2,
    pairs: Sequence[tuple[str, str]] = ARITHMETIC_PAIRS,
    held_out: int | None = None,
) -> dict:
    """For each (old, new) pair: held-out `old` captions (the first `held_out` of the paper's 12 scenes, plain,
    phrasing 0) sampled with and without relation_delta added, from the same noises.

    Returns {"pairs" [P, 2], "metrics", "arithmetic" [P, 2 (baseline, edited), 2 (vs new, vs old), METRICS],
    "delta_norm" [P] (|delta| over the mean |token| of the held-out captions), "images" [P, 2, n, H, W, 3],
    "captions" [P, n], "num_images" (per pair and condition), "seconds"}. arithmetic[..., 0, :] is how often the
    image shows `new` ("flipped"), [..., 1, :] how often it still shows `old` ("kept").
    """
    start = time.perf_counter()
    edited_model = model._replace(conditioner=edited_conditioner(model.conditioner))
    num = len(_pair_specs(pairs[0][0])[1][:held_out]) * images_per_prompt
    sampler = capture.sampler(edited_model, min(num, model.config.eval.batch_size))
    table = np.zeros((len(pairs), 2, 2, len(METRICS)))
    images, captions, norms = [], [], []
    for p, (old, new) in enumerate(pairs):
        delta = relation_delta(model, old, new)
        specs = [s for s in _pair_specs(old)[1][:held_out] for _ in range(images_per_prompt)]
        texts = [prompts.caption(s) for s in specs]
        base_text, base_mask = embed(model, texts)
        token_norm = np.linalg.norm(base_text, axis=-1)[base_mask].mean()
        norms.append(float(np.linalg.norm(delta, axis=-1).sum() / token_norm))
        drawn = []
        for c, d in enumerate((np.zeros_like(delta), delta)):
            drawn.append(sampler(model.params, {"base": model.tables, "delta": d}, texts))
            flipped, kept = _score(drawn[-1], [[s._replace(relation=new) for s in specs], specs])
            table[p, c] = [_means(flipped), _means(kept)]
        images.append(np.stack(drawn))
        captions.append(texts)
    return {
        "pairs": np.array(pairs),
        "metrics": np.array(METRICS),
        "arithmetic": table,
        "delta_norm": np.array(norms),
        "images": np.stack(images),
        "captions": np.array(captions),
        "num_images": num,
        "seconds": time.perf_counter() - start,
    }


# --- report --------------------------------------------------------------------------------------------------------


def run(
    model: AnalysisModel,
    out_dir,
    *,
    images_per_prompt: int = 2,
    captions: Sequence[str] | None = None,
    held_out: int | None = None,
) -> epath.Path:
    """The three analyses (ablations on `captions`, default the eval prompts; arithmetic on `held_out` scenes per pair,
    default all 12), written to out_dir/text: text.npz, prompt_ablation.png, variance_partition.png,
    relation_arithmetic.png, arithmetic_samples.png and summary.md. Returns the directory."""
    captions = list(captions or evaluate.eval_prompt_list(model.config))
    ablation = prompt_ablation(model, captions, images_per_prompt)
    logging.info("Prompt ablation of %s: %.1f s", model.label, ablation["seconds"])
    partition = variance_partition(model)
    logging.info("Variance partition of %s: %.1f s", model.label, partition["seconds"])
    arithmetic = relation_arithmetic(model, images_per_prompt, held_out=held_out)
    logging.info("Relation arithmetic of %s: %.1f s", model.label, arithmetic["seconds"])
    arrays = {
        "metrics": np.array(METRICS),
        "ablation_variants": ablation["variants"],
        "ablation_accuracy": ablation["accuracy"],
        "ablation_accuracy_any_shape": ablation["accuracy_any_shape"],
        "ablation_replace_relation_old": ablation["replace_relation_old"],
        "ablation_examples": ablation["examples"],
        "factors": partition["factors"],
        "pools": partition["pools"],
        "spaces": partition["spaces"],
        "variance_partition": partition["variance_partition"],
        "variance_partition_pools": partition["r2"],
        "arithmetic_pairs": arithmetic["pairs"],
        "arithmetic": arithmetic["arithmetic"],
        "arithmetic_delta_norm": arithmetic["delta_norm"],
        "arithmetic_images": arithmetic["images"],
        "arithmetic_captions": arithmetic["captions"],
    }
    figures = _figures(ablation, partition, arithmetic, model.label)
    return write_report(out_dir, "text", arrays, figures, _summary(ablation, partition, arithmetic, model, captions))


def _figures(ablation: dict, partition: dict, arithmetic: dict, label: str) -> dict:
    plt = pyplot()
    metric = {m: i for i, m in enumerate(METRICS)}
    shown = ("spatial_relationship", "spatial_relationship_loose", "overall")
    fig_ablation, ax = plt.subplots(figsize=(1.2 * len(ablation["variants"]) + 2, 3.8))
    x = np.arange(len(ablation["variants"]))
    width = 0.8 / len(shown)
    for k, m in enumerate(shown):
        ax.bar(x + (k - 1) * width, 100 * ablation["accuracy"][:, metric[m]], width, label=m)
    ax.set_xticks(x, ablation["variants"], rotation=20)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=f"Prompt ablations ({label})")
    ax.legend(fontsize=8)
    fig_ablation.tight_layout()

    fig_partition, axes = plt.subplots(1, len(POOLS), figsize=(4.2 * len(POOLS), 3.6), squeeze=False)
    x = np.arange(len(FACTORS))
    for ax, pool, r2 in zip(axes[0], POOLS, partition["r2"]):
        for s, space in enumerate(SPACES):
            ax.bar(x + (s - 0.5) * 0.4, 100 * r2[s], 0.4, label=space)
        ax.set_xticks(x, FACTORS, rotation=30)
        ax.set(ylabel="variance explained (%)", ylim=(0, 100), title=f"{pool} tokens")
        ax.legend(fontsize=7)
    fig_partition.suptitle(f"Variance of caption embeddings explained by each factor ({label})")
    fig_partition.tight_layout()

    pairs = arithmetic["pairs"]
    fig_arith, axes = plt.subplots(
        len(_RELATION_METRICS), len(pairs), figsize=(4 * len(pairs), 3.2 * len(_RELATION_METRICS)), squeeze=False
    )
    for row, m in enumerate(_RELATION_METRICS):
        for col, (old, new) in enumerate(pairs):
            ax = axes[row][col]
            values = 100 * arithmetic["arithmetic"][col, :, :, metric[m]]  # [condition, target]
            for c, condition in enumerate(("baseline", "edited")):
                ax.bar(np.arange(2) + (c - 0.5) * 0.4, values[c], 0.4, label=condition)
            ax.set_xticks([0, 1], [f"flipped: {new}", f"kept: {old}"])
            ax.set(ylabel=f"{m} (%)", ylim=(0, 100), title=f"'{old}' captions + e({new}) - e({old})")
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7)
    fig_arith.suptitle(f"Relation vector arithmetic ({label})")
    fig_arith.tight_layout()

    shown_images = 8
    fig_samples, axes = plt.subplots(len(pairs), 2, figsize=(6, 3 * len(pairs)), squeeze=False)
    for p, (old, new) in enumerate(pairs):
        for c, title in enumerate((f"'{old}' captions", f"+ e({new}) - e({old})")):
            axes[p][c].imshow(sampling.image_grid(arithmetic["images"][p, c, :shown_images]))
            axes[p][c].set_title(title, fontsize=9)
            axes[p][c].axis("off")
    fig_samples.suptitle(f"Relation arithmetic samples, same noises ({label})")
    return {
        "prompt_ablation": fig_ablation,
        "variance_partition": fig_partition,
        "relation_arithmetic": fig_arith,
        "arithmetic_samples": fig_samples,
    }


def _percent(value: float) -> str:
    return "-" if np.isnan(value) else f"{100 * value:.1f}"


def _summary(ablation: dict, partition: dict, arithmetic: dict, model: AnalysisModel, captions: Sequence[str]) -> str:
    metric = {m: i for i, m in enumerate(METRICS)}
    header = "| " + " | ".join(SHOWN_METRICS) + " |"
    lines = [
        f"# Text analyses: {model.label}",
        "",
        f"## Prompt ablations ({len(captions)} prompts, {ablation['num_images']} images per variant, paired noises)",
        "",
        "Accuracy (%) against the scene each variant asks for (replace_relation: the NEW relation). '-' = skipped "
        "(a cached encoder cannot embed ungrammatical text).",
        "",
        "| variant | example " + header,
        "|---|---" + "|---" * len(SHOWN_METRICS) + "|",
    ]
    rows = [(v, e, a) for v, e, a in zip(ablation["variants"], ablation["examples"], ablation["accuracy"])]
    if not np.isnan(ablation["replace_relation_old"]).all():
        rows.append(("replace_relation vs OLD relation", "", ablation["replace_relation_old"]))
    for name, index in (("drop_shape1", 0), ("drop_shape2", 1)):
        hit = np.flatnonzero(ablation["variants"] == name)
        if len(hit):
            rows.append((f"{name}, any shape", "", ablation["accuracy_any_shape"][hit[0]]))
    for name, example, row in rows:
        lines.append(f"| {name} | {example} | " + " | ".join(_percent(row[metric[m]]) for m in SHOWN_METRICS) + " |")
    lines += [
        "",
        "## Variance partition (R^2 of each factor, %)",
        "",
        f"{partition['num_captions']} plain captions (both colours, every phrasing), each pooled to one vector. Each "
        "factor's share is its one-way ANOVA R^2, except phrasing: a phrasing index names a different phrase for each "
        "relation, so phrasing is nested in relation and its share is what the (relation, phrasing) cells explain "
        "beyond the relation alone (phrasing within relation). The shares add up; the rest is their interactions.",
        "",
        "| pool | space | " + " | ".join(FACTORS) + " |",
        "|---|---" + "|---" * len(FACTORS) + "|",
    ]
    for p, pool in enumerate(POOLS):
        for s, space in enumerate(SPACES):
            lines.append(f"| {pool} | {space} | " + " | ".join(f"{100 * v:.1f}" for v in partition["r2"][p, s]) + " |")
    lines += [
        "",
        f"## Relation vector arithmetic ({arithmetic['num_images']} images per pair and condition)",
        "",
        "Held-out captions (plain, phrasing 0, the paper's scenes) with e(new) - e(old) added to their text-encoder "
        "embeddings (delta averaged over the same-colour / same-shape scenes). flipped = the image shows the new "
        "relation, kept = it still shows the old one (% of images).",
        "",
        "| pair | delta norm / token norm | condition | flipped strict | kept strict | flipped loose | kept loose |",
        "|---|---|---|---|---|---|---|",
    ]
    strict, loose = metric["spatial_relationship"], metric["spatial_relationship_loose"]
    for p, (old, new) in enumerate(arithmetic["pairs"]):
        for c, condition in enumerate(("baseline", "edited")):
            t = arithmetic["arithmetic"][p, c]
            lines.append(
                f"| {old} -> {new} | {arithmetic['delta_norm'][p]:.2f} | {condition} | {_percent(t[0, strict])} | "
                f"{_percent(t[1, strict])} | {_percent(t[0, loose])} | {_percent(t[1, loose])} |"
            )
    lines += [
        "",
        f"Wall time: prompt ablation {ablation['seconds']:.1f} s, variance partition {partition['seconds']:.1f} s, "
        f"relation arithmetic {arithmetic['seconds']:.1f} s.",
        "",
    ]
    return "\n".join(lines)
