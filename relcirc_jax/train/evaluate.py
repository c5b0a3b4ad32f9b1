"""Accuracy of a model on the fixed eval prompt set: sample with EMA weights, score with the detector, tabulate."""
import json
from typing import Sequence

import ml_collections
import numpy as np
from etils import epath

from relcirc_jax import evaluation
from relcirc_jax.data import dataset
from relcirc_jax.data import prompts as prompt_grammar
from relcirc_jax.data.spec import RELATIONS
from relcirc_jax.train import sample as sampling
from relcirc_jax.train import state as train_state

METRICS = ("color", "shape", "exist_binding", "unique_binding", "spatial_relationship", "spatial_relationship_loose",
           "overall")
_SUBSET_SEED = 0  # fixes which prompts a smaller eval.num_prompts keeps, so every run evaluates the same ones


def eval_captions(config: ml_collections.ConfigDict) -> list[str]:
    """The first eval.num_prompts captions of a fixed shuffle of the eval prompt set (all of them by default)."""
    captions = dataset.eval_prompts(config.eval.prompt_set)
    if config.eval.num_prompts >= len(captions):
        return captions
    keep = np.random.default_rng(_SUBSET_SEED).permutation(len(captions))[:config.eval.num_prompts]
    return [captions[i] for i in sorted(keep)]


def score_captions(sampler: sampling.Sampler, params, tables, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-caption bool arrays for every metric in METRICS."""
    images = sampler(params, tables, captions)
    scores = evaluation.score(images, list(captions))
    return {name: np.asarray(scores[name], bool) for name in METRICS}


def summary(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean accuracies under TensorBoard names (eval/color, ..., eval/overall)."""
    return {f"eval/{name}": float(np.mean(scores[name])) for name in METRICS}


def accuracy_table(scores: dict[str, np.ndarray], captions: Sequence[str]) -> dict:
    """{"num_prompts", "overall": {metric: acc}, "per_relation": {relation: {metric: acc, "n": count}}}."""
    relations = np.array([prompt_grammar.parse(c).spec.relation for c in captions])
    per_relation = {}
    for relation in RELATIONS:
        rows = relations == relation
        if rows.any():
            per_relation[relation] = {"n": int(rows.sum()), **{m: float(scores[m][rows].mean()) for m in METRICS}}
    return {"num_prompts": len(captions), "overall": {m: float(scores[m].mean()) for m in METRICS},
            "per_relation": per_relation}


def markdown_table(table: dict, step: int) -> str:
    """The accuracy table as Markdown: one row for all prompts, one per relation, accuracies in %."""
    lines = [f"# Accuracy at step {step} ({table['num_prompts']} prompts)", "",
             "| prompts | n | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    rows = [("all", {"n": table["num_prompts"], **table["overall"]})] + list(table["per_relation"].items())
    for name, row in rows:
        lines.append(f"| {name} | {row['n']} | " + " | ".join(f"{100 * row[m]:.1f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def run_evaluate(config: ml_collections.ConfigDict, workdir, step: int | None = None) -> dict:
    """Evaluates checkpoint `step` (default the latest) of `workdir`: writes eval.json and eval.md there, prints the markdown table and
    returns the table."""
    experiment = train_state.build_experiment(config, workdir)
    step, state = train_state.restore_or_fail(experiment, workdir, step)
    captions = eval_captions(config)
    sampler = sampling.make_sampler(experiment, config.eval.batch_size)
    scores = score_captions(sampler, state.ema_params, experiment.tables, captions)
    table = {"step": step, **accuracy_table(scores, captions)}
    workdir = epath.Path(workdir)
    (workdir / "eval.json").write_text(json.dumps(table, indent=2))
    markdown = markdown_table(table, step)
    (workdir / "eval.md").write_text(markdown)
    print(markdown, flush=True)
    experiment.checkpointer.close()
    return table
