"""relcirc_jax.analysis: circuit analyses of a trained DiT as compiled JAX passes.

`run_analyze(config, workdir, step)` (CLI: --mode=analyze) runs config.analysis.kind on the EMA weights of a
checkpoint (or of the reference model config.init_from) and writes each kind's arrays, figures and summary under
workdir/analysis/<kind>/:

    synopsis   attention mass of object / background tokens per caption role and image group (capture pass)
    qk_screen  weight-space screen: cross-attention QK logits of image positions against each relation word
    ablation   every single head zero- (or mean-) ablated in one vmapped sampler, scored by the evaluator
"""

import time

import ml_collections
from absl import logging
from etils import epath

from relcirc_jax.config import ANALYSIS_KINDS

KINDS = tuple(kind for kind in ANALYSIS_KINDS if kind != "all")


def run_analyze(config: ml_collections.ConfigDict, workdir, step: int | None = None) -> dict[str, float]:
    """Runs the analyses config.analysis.kind names; returns {kind: wall seconds}."""
    from relcirc_jax.analysis import ablation, context, qk_screen, synopsis

    model = context.from_workdir(config, workdir, step)
    out_dir = epath.Path(workdir) / "analysis"
    a = config.analysis
    kinds = KINDS if a.kind == "all" else (a.kind,)
    runners = {
        "synopsis": lambda: synopsis.run(model, out_dir, images_per_prompt=a.images_per_prompt),
        "qk_screen": lambda: qk_screen.run(model, out_dir),
        "ablation": lambda: ablation.run(model, out_dir, images_per_prompt=a.images_per_prompt, mode=a.ablation_mode),
    }
    seconds = {}
    for kind in kinds:
        logging.info("Analysis %s of %s ...", kind, model.label)
        start = time.perf_counter()
        runners[kind]()
        seconds[kind] = time.perf_counter() - start
        print(f"{kind}: {out_dir / kind} ({seconds[kind]:.1f} s)", flush=True)
    return seconds
