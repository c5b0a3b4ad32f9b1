"""What every analysis reads: a trained model (EMA weights, its DiT config, text conditioner, mesh) and where to write.

An `AnalysisModel` comes from a run's checkpoint or, with config.init_from, a reference model under pretrained/
(`from_workdir`), or from params in memory (`from_params`, e.g. of `pretrained.load`). Analyses are functions of it;
`write_report` puts their arrays (.npz), figures (PNG) and a markdown summary under `<out_dir>/<kind>/`.
"""

from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from etils import epath

from relcirc_jax.models import arch
from relcirc_jax.text.conditioner import TextConditioner


class AnalysisModel(NamedTuple):
    config: ml_collections.ConfigDict  # the run's full config (eval.* sets the sampler: steps, CFG, solver, seed)
    model_cfg: arch.ModelConfig
    params: Any  # EMA parameters, float32, placed on `mesh` (replicated or as the run shards them)
    conditioner: TextConditioner
    tables: Any  # the conditioner's tables, replicated on `mesh`
    mesh: jax.sharding.Mesh
    param_sh: Any  # shardings of `params`
    label: str  # e.g. "rte_dit_micro step 20000", for figure titles


def from_workdir(config: ml_collections.ConfigDict, workdir, step: int | None = None) -> AnalysisModel:
    """The EMA weights of checkpoint `step` (default the latest) of the run in `workdir` (or of the reference model
    config.init_from while the workdir has no checkpoint)."""
    from relcirc_jax.train import state as train_state

    train_state.require_weights(config, workdir, step)
    setup = train_state.build_run_setup(config, workdir)
    step, ema_params = train_state.ema_weights(setup, workdir, step)
    setup.checkpointer.close()
    name = epath.Path(config.init_from).name if config.get("init_from") else epath.Path(workdir).name
    return _model(setup, ema_params, f"{name} step {step}")


def from_params(config: ml_collections.ConfigDict, params, workdir, label: str, devices=None) -> AnalysisModel:
    """An AnalysisModel of given float32 params (e.g. `pretrained.load`) with `config`'s text encoder, on a mesh of
    `devices` (default all)."""
    from relcirc_jax.train import state as train_state

    setup = train_state.build_run_setup(config, workdir, devices)
    setup.checkpointer.close()
    return _model(setup, train_state.place_params(setup, params), label)


def _model(setup, params, label: str) -> AnalysisModel:
    return AnalysisModel(
        setup.config,
        setup.model_cfg,
        params,
        setup.conditioner,
        setup.tables,
        setup.mesh,
        setup.state_shardings.ema_params,
        label,
    )


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (analyses draw figures on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def annotate_cells(ax, image, values: np.ndarray, fmt: str = ".2f") -> None:
    """Writes each value of a [rows, columns] heatmap drawn by `image = ax.imshow(values, ...)` on its cell, in black
    or white by the luminance of the cell's colour, so the numbers stay readable at both ends of any colour map."""
    for (row, column), value in np.ndenumerate(values):
        red, green, blue, _ = image.cmap(image.norm(value)) if np.isfinite(value) else (1.0, 1.0, 1.0, 1.0)
        colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        ax.text(column, row, format(value, fmt), ha="center", va="center", fontsize=7, color=colour)


def write_report(out_dir, kind: str, arrays: dict[str, np.ndarray], figures: dict, summary: str) -> epath.Path:
    """Writes `<out_dir>/<kind>/{kind}.npz`, one PNG per matplotlib figure in `figures` (name -> Figure) and
    summary.md; closes the figures; returns the directory."""
    plt = pyplot()
    directory = epath.Path(out_dir) / kind
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{kind}.npz").open("wb") as f:
        np.savez(f, **{name: np.asarray(value) for name, value in arrays.items()})
    for name, figure in figures.items():
        with (directory / f"{name}.png").open("wb") as f:
            figure.savefig(f, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)
    (directory / "summary.md").write_text(summary)
    return directory
