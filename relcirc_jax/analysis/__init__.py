"""relcirc_jax.analysis: circuit analyses of a trained DiT as compiled JAX passes.

`run_analyze(config, workdir, step)` (CLI: --mode=analyze) runs config.analysis.kind on the EMA weights of a
checkpoint (or of the reference model config.init_from) and writes each kind's arrays, figures and summary under
workdir/analysis/<kind>/, and every summary there in one workdir/analysis/report.md:

    synopsis   attention mass of object / background tokens per caption role and image group (capture pass)
    qk_screen  weight-space screen: cross-attention QK logits of image positions against each relation word
    ablation   every single head zero- (or mean-) ablated in one vmapped sampler, scored by the evaluator; the QK
               screen's top cross-attention heads ablated together vs random sets of as many heads
    patching   clean and corrupted prompts sampled side by side; every head output and residual stream patched from
               the corrupted twin, per step window, in one vmapped sampler; the share of the effect each transfers
    text       prompt ablations (drop / replace the relation or a shape word, fillers, synonyms), variance of the
               caption embeddings by factor before and after the caption projection, relation vector arithmetic
    dynamics   every saved checkpoint of the run: accuracy per component and the synopsis' head scores over training
               (skipped by "all" when the workdir has no checkpoint, e.g. with only --init_from)
    diversity  (only when named; not part of "all") the accuracy-vs-diversity study of contextual repulsion against
               the CFG sweep, interval guidance, particle guidance, CADS and image-token repulsion (frontier.py)
    probe      (MM-DiT only, only when named) the study's diagnostic D1: linear probes from the text and image
               streams after each block, at each solver step, to the final layout (probe.py)

On an MM-DiT (model.arch="mmdit") every analysis reads its joint attention: image queries on caption keys stand for
cross-attention, on image keys for self-attention, and there is one kind of head, "joint" (synopsis, qk_screen,
ablation, patching, dynamics).
"""

import time

import ml_collections
from absl import logging
from etils import epath

from relcirc_jax.config import ANALYSIS_KINDS
from relcirc_jax.errors import UserError

# The circuit analyses, what "all" runs; the accuracy-vs-diversity study and its probe run only when named.
KINDS = tuple(kind for kind in ANALYSIS_KINDS if kind not in ("all", "diversity", "probe"))


def run_analyze(config: ml_collections.ConfigDict, workdir, step: int | None = None) -> dict[str, float]:
    """Runs the analyses config.analysis.kind names; returns {kind: wall seconds}."""
    from relcirc_jax.analysis import ablation, context, dynamics, frontier, patching, probe, qk_screen, synopsis, text
    from relcirc_jax.train import checkpoint

    a = config.analysis
    kinds = KINDS if a.kind == "all" else (a.kind,)
    if a.kind == "probe" and config.model.arch != "mmdit":
        raise UserError(
            "--config.analysis.kind=probe reads an MM-DiT's text stream, and this model is a PixArt DiT, whose "
            "caption tokens are the same static caption in every sample. Fix: analyze an MM-DiT (model.arch=mmdit)."
        )
    model = context.from_workdir(config, workdir, step)
    out_dir = epath.Path(workdir) / "analysis"
    if a.kind == "all" and not checkpoint.saved_steps(epath.Path(workdir) / "checkpoints"):
        kinds = tuple(kind for kind in kinds if kind != "dynamics")
        logging.info("No checkpoints in %s: skipping the dynamics analysis.", workdir)
    runners = {
        "synopsis": lambda: synopsis.run(model, out_dir, images_per_prompt=a.images_per_prompt),
        "qk_screen": lambda: qk_screen.run(model, out_dir),
        "ablation": lambda: ablation.run(
            model,
            out_dir,
            images_per_prompt=a.images_per_prompt,
            mode=a.ablation_mode,
            top_heads=ablation.top_relation_heads(model, a.ablation_top_heads) if a.ablation_top_heads else None,
        ),
        "patching": lambda: patching.run(
            model,
            out_dir,
            num_prompts=a.patching_prompts,
            images_per_prompt=a.images_per_prompt,
            corruption=a.patching_corruption,
            num_windows=a.patching_windows,
        ),
        "text": lambda: text.run(model, out_dir, images_per_prompt=a.images_per_prompt),
        "dynamics": lambda: dynamics.run(config, workdir, out_dir, images_per_prompt=a.images_per_prompt),
        "diversity": lambda: frontier.run(
            model,
            out_dir,
            num_prompts=a.diversity_prompts,
            groups=a.diversity_groups,
            group_size=a.diversity_group_size,
            grid=a.diversity_grid,
            metric=a.diversity_metric,
            m=a.diversity_m,
        ),
        "probe": lambda: probe.run(model, out_dir, num_prompts=a.probe_prompts, images_per_prompt=a.probe_images),
    }
    seconds = {}
    for kind in kinds:
        logging.info("Analysis %s of %s ...", kind, model.label)
        start = time.perf_counter()
        runners[kind]()
        seconds[kind] = time.perf_counter() - start
        print(f"{kind}: {out_dir / kind} ({seconds[kind]:.1f} s)", flush=True)
    print(f"report: {write_index(out_dir, model.label, seconds)}", flush=True)
    return seconds


def write_index(out_dir, label: str, seconds: dict[str, float]) -> epath.Path:
    """Writes `<out_dir>/report.md`: every analysis summary found under out_dir (in KINDS order, whenever it was run)
    in one document, after a table of the kinds, their figures and the wall time of those run just now."""
    out_dir = epath.Path(out_dir)
    present = [kind for kind in KINDS + ("diversity", "probe") if (out_dir / kind / "summary.md").exists()]
    lines = [
        f"# Circuit analyses: {label}",
        "",
        "| analysis | figures | wall time of this run |",
        "|---|---|---|",
    ]
    for kind in present:
        figures = ", ".join(f"[{p.stem}]({kind}/{p.name})" for p in sorted((out_dir / kind).glob("*.png")))
        took = f"{seconds[kind]:.1f} s" if kind in seconds else "(an earlier run)"
        lines.append(f"| [{kind}]({kind}/summary.md) | {figures} | {took} |")
    for kind in present:
        summary = (out_dir / kind / "summary.md").read_text().strip()
        lines += ["", "\n".join(("#" + line if line.startswith("#") else line) for line in summary.splitlines())]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
