"""Accuracy of a model on a fixed eval prompt set: sample with EMA weights, score with the detectors, tabulate.

The protocol is the paper's by default: the 96 `paper_main` prompts, eval.images_per_prompt images each (the paper:
100), each image from its own fixed noise seed, DPM-Solver++ 14 steps, CFG 4.5 against sample.negative.
`--mode=evaluate` scores every image with this project's detector and with the paper's (evaluation.DETECTORS),
prints both tables and writes what it judged: the images, captions and per-image verdicts (.npz) and a grid of the
first images with the detected objects and verdicts drawn on them (PNG).
"""

import json
from typing import Sequence

import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from relcirc_jax import evaluation
from relcirc_jax.data import dataset
from relcirc_jax.data import prompts as prompt_grammar
from relcirc_jax.data.spec import RELATIONS
from relcirc_jax.evaluation.scoring import METRICS, PAPER_COLUMNS
from relcirc_jax.train import sampling
from relcirc_jax.train import state as train_state

_SUBSET_SEED = 0  # fixes which prompts a smaller eval.num_prompts keeps, so every run evaluates the same ones
GRID_IMAGES = 64  # images drawn with their verdicts in eval_grid_{detector}.png


def eval_prompt_list(config: ml_collections.ConfigDict) -> list[str]:
    """The first eval.num_prompts prompts of a fixed shuffle of the eval prompt set: all of them when it holds no more
    (the default 96 is all of paper_main, a subset of the larger sets; the tables name the prompt count)."""
    captions = dataset.eval_prompts(config.eval.prompt_set)
    if config.eval.num_prompts >= len(captions):
        return captions
    keep = np.random.default_rng(_SUBSET_SEED).permutation(len(captions))[: config.eval.num_prompts]
    return [captions[i] for i in sorted(keep)]


def eval_captions(config: ml_collections.ConfigDict) -> list[str]:
    """One caption per evaluated image: each prompt eval.images_per_prompt times in a row. Image i's noise is a
    function of (eval.seed, i), so the images of a prompt differ and every run draws the same ones."""
    return [c for c in eval_prompt_list(config) for _ in range(config.eval.images_per_prompt)]


def score_images(images: np.ndarray, captions: Sequence[str], detector: str = "relcirc"):
    """(per-image bool arrays for every metric in METRICS, the detections) of `images` against their captions."""
    specs = [prompt_grammar.parse(c).spec for c in captions]
    detections = evaluation.detect_with(detector, images)
    scores = evaluation.score_detections(detections, evaluation.encode_specs(specs), size=images.shape[1])
    return {name: np.asarray(scores[name], bool) for name in METRICS}, detections


def summary(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean accuracies under TensorBoard names (eval/color, ..., eval/overall)."""
    return {f"eval/{name}": float(np.mean(scores[name])) for name in METRICS}


def _mean_rows(scores: dict[str, np.ndarray], groups: np.ndarray, names: Sequence[str]) -> dict:
    return {
        name: {"n": int((groups == name).sum()), **{m: float(scores[m][groups == name].mean()) for m in METRICS}}
        for name in names
        if (groups == name).any()
    }


def accuracy_table(scores: dict[str, np.ndarray], captions: Sequence[str]) -> dict:
    """{"num_images", "num_prompts", "overall": {metric: acc}, "per_relation": {relation: {metric: acc, "n"}},
    "per_template": {...} (only when the captions use several templates)}."""
    parsed = [prompt_grammar.parse(c) for c in captions]
    table = {
        "num_images": len(captions),
        "num_prompts": len(set(captions)),
        "overall": {m: float(scores[m].mean()) for m in METRICS},
        "per_relation": _mean_rows(scores, np.array([p.spec.relation for p in parsed]), RELATIONS),
    }
    templates = np.array([p.template for p in parsed])
    if len(set(templates)) > 1:
        table["per_template"] = _mean_rows(scores, templates, tuple(prompt_grammar.TEMPLATES))
    return table


def markdown_table(table: dict, step: int, detector: str = "relcirc") -> str:
    """The accuracy table as Markdown: one row for all images, one per relation (and template), accuracies in %."""
    lines = [
        f"# Accuracy at step {step}, {detector} detector ({table['num_prompts']} prompts, "
        f"{table['num_images']} images)",
        "",
        "| images | n | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    rows = [("all", {"n": table["num_images"], **table["overall"]})]
    rows += list(table["per_relation"].items()) + list(table.get("per_template", {}).items())
    for name, row in rows:
        lines.append(f"| {name} | {row['n']} | " + " | ".join(f"{100 * row[m]:.1f}" for m in METRICS) + " |")
    paper = ", ".join(f"{column} = {metric}" for column, metric in PAPER_COLUMNS.items())
    lines += [
        "",
        f"Comparable with the paper's main table (DESIGN §1): {paper}; relation columns count only images "
        "whose binding is unique; overall needs colour, shape, unique binding and the strict relation.",
    ]
    return "\n".join(lines) + "\n"


def _write_artifacts(workdir: epath.Path, images: np.ndarray, captions: Sequence[str], judged: dict) -> None:
    """eval_samples.npz (images, captions, verdicts per detector) and eval_grid_{detector}.png."""
    verdicts = {f"{detector}/{m}": scores[m] for detector, (scores, _) in judged.items() for m in METRICS}
    with (workdir / "eval_samples.npz").open("wb") as f:
        np.savez(f, images=images, captions=np.array(captions), **verdicts)
    from relcirc_jax.evaluation import annotate  # PIL drawing, only needed here

    shown = slice(0, min(GRID_IMAGES, len(images)))
    for detector, (scores, detections) in judged.items():
        keep = detections.image < shown.stop
        subset = evaluation.Detections(*(np.asarray(field)[keep] for field in detections))
        tiles = annotate.annotate(images[shown], subset, {m: v[shown] for m, v in scores.items()})
        with (workdir / f"eval_grid_{detector}.png").open("wb") as f:
            Image.fromarray(sampling.image_grid(tiles)).save(f, format="PNG")


def run_evaluate(config: ml_collections.ConfigDict, workdir, step: int | None = None) -> dict:
    """Evaluates checkpoint `step` (default the latest) of `workdir` with every detector: writes eval.json, eval.md,
    eval_samples.npz and eval_grid_*.png there, prints the markdown tables and returns {detector: table}."""
    captions = eval_captions(config)
    train_state.require_weights(config, workdir, step)  # before anything slow, and creating nothing
    setup = train_state.build_run_setup(config, workdir)
    step, ema_params = train_state.ema_weights(setup, workdir, step)
    sampler = sampling.make_sampler(setup, config.eval.batch_size)
    images = sampler(ema_params, setup.tables, captions)
    setup.checkpointer.close()
    judged = {detector: score_images(images, captions, detector) for detector in evaluation.DETECTORS}
    tables = {detector: {"step": step, **accuracy_table(scores, captions)} for detector, (scores, _) in judged.items()}
    workdir = epath.Path(workdir)
    (workdir / "eval.json").write_text(
        json.dumps(
            {"step": step, "prompt_set": config.eval.prompt_set, "negative": config.sample.negative, "tables": tables},
            indent=2,
        )
    )
    markdown = "\n".join(markdown_table(table, step, detector) for detector, table in tables.items())
    (workdir / "eval.md").write_text(markdown)
    _write_artifacts(workdir, images, captions, judged)
    print(markdown, flush=True)
    print(f"What was judged: {workdir / 'eval_grid_relcirc.png'} and eval_grid_paper.png (each detector's view).")
    return tables
