"""Training dynamics: accuracy per metric and the attention synopsis' head scores at every saved checkpoint of a run,
to see the learning order (colour -> shape -> binding -> relation) and when the relation and object heads form.

Per checkpoint (oldest first): its EMA weights sample the eval prompts (images_per_prompt seeds each) with the run's
eval sampler, the evaluator scores those images, groups their image tokens (groups.image_token_groups) and one capture
pass with the same noises reduces the attention patterns (synopsis.reduce_attention). The setup, the plain sampler
and the capture sampler are built once, so every checkpoint after the first reuses the compiled functions; the
capture pass reads the current checkpoint's image-token groups from a holder its extra_fields closes over.

Also read: the training run's own eval curve (eval/* scalars in workdir/tb, written by train.metrics), drawn next to
the re-scored one (the run's eval may use more seeds per prompt, so the two agree only where eval.images_per_prompt
equals images_per_prompt).
"""

import time

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from relcirc_jax.analysis import capture, groups, synopsis
from relcirc_jax.analysis.context import AnalysisModel, pyplot, write_report
from relcirc_jax.evaluation.scoring import METRICS
from relcirc_jax.train import checkpoint, evaluate, sampling
from relcirc_jax.train import state as train_state

# (metric, label) of the accuracy curves; "relation" is drawn both as the paper's column (loose) and strict.
_KEPT = ("relation_score", "object_score", "role_mass")  # per checkpoint, of synopsis.summarize
CURVES = (
    ("color", "colour"),
    ("shape", "shape"),
    ("unique_binding", "unique binding"),
    ("spatial_relationship_loose", "relation (loose, paper's column)"),
    ("spatial_relationship", "relation (strict)"),
    ("overall", "overall"),
)


def run(
    config: ml_collections.ConfigDict, workdir, out_dir, *, images_per_prompt: int = 1, max_checkpoints=None
) -> epath.Path:
    """Evaluates and captures every saved checkpoint of `workdir` (at most `max_checkpoints` of them, evenly spaced,
    the first and last included); writes dynamics.npz, figures and summary.md under out_dir/dynamics and returns that
    directory."""
    workdir = epath.Path(workdir)
    train_state.require_checkpoint(workdir)
    steps = select_steps(checkpoint.saved_steps(workdir / "checkpoints"), max_checkpoints)
    captions = [c for c in evaluate.eval_prompt_list(config) for _ in range(images_per_prompt)]
    setup = train_state.build_run_setup(config, workdir)
    try:
        model, plain, captured, holder = _samplers(setup, captions)
        rows, seconds, start = [], [], time.perf_counter()
        for i, step in enumerate(steps):
            began = time.perf_counter()
            _, state = train_state.restore_or_fail(setup, workdir, step)
            rows.append(_checkpoint(model._replace(params=state.ema_params), plain, captured, holder, captions))
            del state
            seconds.append(time.perf_counter() - began)
            elapsed = time.perf_counter() - start
            logging.info(
                "Dynamics: step %d (%d/%d) in %.1f s; elapsed %.1f s, ETA %.1f s; %s",
                step,
                i + 1,
                len(steps),
                seconds[-1],
                elapsed,
                elapsed / (i + 1) * (len(steps) - i - 1),
                {m: round(float(rows[-1]["accuracy"][METRICS.index(m)]), 3) for m, _ in CURVES},
            )
    finally:
        setup.checkpointer.close()
    arrays = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    logged_steps, logged_accuracy = logged_eval(workdir)
    arrays.update(
        steps=np.asarray(steps, np.int64),
        metrics=np.array(METRICS),
        roles=np.array(groups.TEXT_ROLES),
        seconds=np.asarray(seconds, np.float64),
        logged_steps=logged_steps,
        logged_accuracy=logged_accuracy,
    )
    cfg = setup.model_cfg
    label = workdir.name
    figures = _figures(arrays, label, cfg.depth, cfg.num_heads)
    summary = _summary(arrays, label, config, len(captions), images_per_prompt)
    return write_report(out_dir, "dynamics", arrays, figures, summary)


def select_steps(saved: list[int], max_checkpoints: int | None) -> list[int]:
    """`saved` (ascending), or `max_checkpoints` of them evenly spaced with the first and the last."""
    if max_checkpoints is not None and max_checkpoints < 1:
        raise ValueError(f"max_checkpoints must be >= 1 or None, got {max_checkpoints}.")
    if max_checkpoints is None or len(saved) <= max_checkpoints:
        return list(saved)
    if max_checkpoints == 1:
        return [saved[-1]]
    picks = np.unique(np.linspace(0, len(saved) - 1, max_checkpoints).round().astype(int))
    return [saved[i] for i in picks]


def _samplers(setup: train_state.RunSetup, captions: list[str]):
    """(model without params, plain sampler, capture sampler, holder): both samplers are built once for every
    checkpoint; the capture sampler reads the image-token groups of the current checkpoint from holder["groups"]."""
    model = AnalysisModel(
        setup.config,
        setup.model_cfg,
        None,
        setup.conditioner,
        setup.tables,
        setup.mesh,
        setup.state_shardings.ema_params,
        "",
    )
    batch_size = min(len(captions), setup.config.eval.batch_size)
    holder = {"roles": groups.token_roles(setup.conditioner, captions), "groups": None}

    def extra_fields(padded):
        pad = len(padded) - len(captions)
        return {name: np.concatenate([holder[name], holder[name][-1:].repeat(pad, 0)]) for name in ("roles", "groups")}

    names = synopsis.attention_names(setup.model_cfg)
    plain = capture.sampler(model, batch_size)
    captured = capture.sampler(model, batch_size, names, synopsis.reduce_attention, extra_fields)
    return model, plain, captured, holder


def _checkpoint(model: AnalysisModel, plain, captured, holder: dict, captions: list[str]) -> dict[str, np.ndarray]:
    """One checkpoint's row: accuracy [K], relation_score / object_score [L, H], role_mass [L, H, R],
    bound_fraction."""
    images = plain(model.params, model.tables, captions)
    scores, _ = evaluate.score_images(images, captions)
    token_groups = groups.image_token_groups(
        images, captions, model.model_cfg.patch_size, radius=model.config.data.radius
    ).astype(np.float32)
    holder["groups"] = token_groups
    _, sums = captured(model.params, model.tables, captions)
    return {
        "accuracy": np.array([scores[m].mean() for m in METRICS], np.float64),
        **{k: v for k, v in synopsis.summarize(sums, token_groups).items() if k in _KEPT},
        "bound_fraction": np.float32((token_groups[:, :, 0].sum(1) > 0).mean()),
    }


def logged_eval(workdir) -> tuple[np.ndarray, np.ndarray]:
    """(steps [T], accuracy [T, K] in METRICS order; NaN where a metric was not logged) of the eval/* scalars the
    training loop wrote to workdir/tb; empty when there are none or TensorBoard is not installed."""
    empty = np.zeros((0,), np.int64), np.zeros((0, len(METRICS)), np.float64)
    directory = epath.Path(workdir) / "tb"
    if not directory.is_dir():
        return empty
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        logging.warning("tensorboard is not installed: the run's logged eval curve is not read.")
        return empty
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", ()))
    values = {}  # step -> {metric: value}; a later event of the same step (a resumed run) wins
    for k, metric in enumerate(METRICS):
        if f"eval/{metric}" in tags:
            for event in accumulator.Scalars(f"eval/{metric}"):
                values.setdefault(event.step, np.full(len(METRICS), np.nan))[k] = event.value
    if not values:
        return empty
    steps = np.array(sorted(values), np.int64)
    return steps, np.stack([values[s] for s in steps]).astype(np.float64)


def _figures(arrays: dict, label: str, depth: int, heads: int) -> dict:
    plt = pyplot()
    steps = arrays["steps"]
    fig_acc, ax = plt.subplots(figsize=(7, 4))
    for i, (metric, name) in enumerate(CURVES):
        k = METRICS.index(metric)
        color = f"C{i}"
        ax.plot(steps, arrays["accuracy"][:, k], marker="o", color=color, label=name)
        if len(arrays["logged_steps"]):
            logged = arrays["logged_accuracy"][:, k]
            ax.plot(arrays["logged_steps"], logged, ls="none", marker="x", color=color)
    if len(arrays["logged_steps"]):
        ax.plot([], [], ls="none", marker="x", color="k", label="run's own eval (tb)")
    ax.set(xlabel="training step", ylabel="accuracy", ylim=(-0.02, 1.02), title=f"Accuracy over training ({label})")
    ax.legend(fontsize=7)
    return {
        "accuracy_curves": fig_acc,
        "relation_heads_over_training": _heads_figure(
            plt, arrays["relation_score"], steps, depth, heads, f"Relation heads: object tokens -> relation ({label})"
        ),
        "object_heads_over_training": _heads_figure(
            plt, arrays["object_score"], steps, depth, heads, f"Object heads: object tokens -> own shape ({label})"
        ),
    }


def _heads_figure(plt, score: np.ndarray, steps: np.ndarray, depth: int, heads: int, title: str):
    """Left: a [steps x layer*head] heatmap of `score` [S, L, H]; right: the top 3 heads of the last checkpoint (and
    the mean of the others) over training."""
    flat = score.reshape(len(steps), depth * heads)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, 0.35 * len(steps) + 3), width_ratios=(3, 2), layout="constrained"
    )  # constrained: the colour bar's ticks otherwise run under the right panel's axis label
    image = left.imshow(flat, cmap="viridis", vmin=0, aspect="auto")
    names = [f"L{layer}H{head}" for layer in range(depth) for head in range(heads)]
    left.set(xticks=range(len(names)), yticks=range(len(steps)), xlabel="head", ylabel="training step")
    left.set_xticklabels(names, rotation=90, fontsize=6)
    left.set_yticklabels([str(s) for s in steps], fontsize=7)
    fig.colorbar(image, ax=left, fraction=0.05)
    top = [int(layer) * heads + int(head) for layer, head in synopsis.ranking(score[-1])[:3]]
    for i in top:
        right.plot(steps, flat[:, i], marker="o", label=names[i])
    others = np.delete(flat, top, axis=1)
    if others.size:
        right.plot(steps, others.mean(1), ls="--", color="gray", label="mean of the other heads")
    right.set(xlabel="training step", ylabel="attention mass", title="top heads at the last checkpoint")
    right.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def _summary(arrays: dict, label: str, config: ml_collections.ConfigDict, num_images: int, per_prompt: int) -> str:
    shown = [metric for metric, _ in CURVES]
    lines = [
        f"# Training dynamics: {label}",
        "",
        f"{len(arrays['steps'])} checkpoints; at each, {num_images} images ({num_images // per_prompt} eval prompts x "
        f"{per_prompt} seeds, the run's eval sampler: {sampling.describe_eval_sampler(config)}) scored by "
        "the relcirc detector, then one capture pass of the same noises. Accuracies in %; head scores are attention "
        "probabilities of object tokens averaged over solver steps and both objects (only images whose objects the "
        "evaluator bound count: `bound`).",
        "",
        "| step | " + " | ".join(shown) + " | bound | top relation head | top object head | wall s |",
        "|---" * (len(shown) + 5) + "|",
    ]
    for i, step in enumerate(arrays["steps"]):
        rel = synopsis.ranking(arrays["relation_score"][i])[0]
        obj = synopsis.ranking(arrays["object_score"][i])[0]
        accuracy = " | ".join(f"{100 * arrays['accuracy'][i, METRICS.index(m)]:.1f}" for m in shown)
        lines.append(
            f"| {step} | {accuracy} | {100 * float(arrays['bound_fraction'][i]):.0f} % | "
            f"L{rel[0]} H{rel[1]} {arrays['relation_score'][i][tuple(rel)]:.3f} | "
            f"L{obj[0]} H{obj[1]} {arrays['object_score'][i][tuple(obj)]:.3f} | {arrays['seconds'][i]:.1f} |"
        )
    lines += ["", f"Total wall time {arrays['seconds'].sum():.1f} s (the first checkpoint includes compilation).", ""]
    if len(arrays["logged_steps"]):
        lines += [
            f"The run's own eval curve (eval/* in tb; eval.images_per_prompt = {config.eval.images_per_prompt}):",
            "",
            "| step | " + " | ".join(shown) + " |",
            "|---" * (len(shown) + 1) + "|",
        ]
        for step, row in zip(arrays["logged_steps"], arrays["logged_accuracy"]):
            lines.append(f"| {step} | " + " | ".join(f"{100 * row[METRICS.index(m)]:.1f}" for m in shown) + " |")
        lines.append("")
    else:
        lines += ["No eval/* scalars in the run's tb/ directory.", ""]
    return "\n".join(lines)
