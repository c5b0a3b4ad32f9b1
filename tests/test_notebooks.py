"""The notebooks under colabs/ run top to bottom in a fresh kernel (CPU, the reference models with tiny prompt counts
and 2 sampler steps; learning_dynamics on the :smoke run) and save every figure as a non-blank PNG. They are committed
without outputs, each with its Colab badge and a parameters cell."""

import pathlib

import nbformat
import numpy as np
import pytest
from PIL import Image
from xla_env import subprocess_env

REPO = pathlib.Path(__file__).resolve().parent.parent
COLABS = REPO / "colabs"
BADGE = "https://colab.research.google.com/github/relcirc-jax/relcirc_jax/blob/main/colabs/{}.ipynb"
TINY = {"SAMPLER_STEPS": 2, "NUM_PROMPTS": 2, "IMAGES_PER_PROMPT": 1}  # the same captions share compiled samplers
SYNOPSIS_PNGS = ("synopsis/cross_roles", "synopsis/head_rankings", "synopsis/relation_over_steps")
TEXT_PNGS = ("prompt_ablation", "variance_partition", "relation_arithmetic", "arithmetic_samples")

# notebook -> (parameters injected after its parameters cell, the PNGs it must write under OUT_DIR)
CASES = {
    "quickstart": (
        {"PROMPTS": ["red square is above blue circle", "blue triangle is to the left of red circle"], "SHOWN": 2},
        ("samples", "accuracy", "detections"),
    ),
    "attention_synopsis": (
        {"OVERLAY_IMAGES": 2},
        SYNOPSIS_PNGS + ("top_head_roles_over_steps", "relation_overlays", "per_head_overlays", "overlay_over_steps"),
    ),
    "head_ablation": ({}, ("effect_map", "effect_cis", "samples_relation_head", "samples_random_head")),
    "weight_space_screen": (
        {"TOP_HEADS": 2},
        ("head_scores", "reference_maps", "logit_maps", "qk_vs_synopsis") + SYNOPSIS_PNGS,
    ),
    "text_encoders": (
        # minilm_dit_micro is left out: encoding MiniLM's ~10,700 captions costs a minute or two here, and
        # tests/test_pretrained.py already samples and scores that model; it joins the same loop as the other two.
        {"HELD_OUT": 1, "MINILM_MODEL": None},
        ("variance_partition", "relation_arithmetic")
        + tuple(f"{model}/text/{name}" for model in ("rte_dit_micro", "rte_nopos_dit_micro") for name in TEXT_PNGS),
    ),
    "learning_dynamics": (
        {"MAX_CHECKPOINTS": 2},
        ("dynamics/accuracy_curves", "dynamics/relation_heads_over_training", "dynamics/object_heads_over_training")
        + ("synopsis_over_training",),
    ),
}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


def _parameters_index(notebook) -> int:
    return next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", ()))


def with_parameters(notebook, values: dict):
    """`notebook` with one cell assigning `values` right after its parameters cell (papermill's injection)."""
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(_parameters_index(notebook) + 1, cell)
    return notebook


@pytest.fixture(scope="module")
def kernel_env() -> dict:
    """The kernels' environment: CPU, one XLA device (conftest's 8 fake devices would pad every small batch to 8 on 2
    cores), conftest's persistent compilation cache (the six kernels compile the same samplers of the same reference
    model) and its other XLA flags."""
    return subprocess_env()


def test_every_notebook_has_a_case():
    assert sorted(p.stem for p in COLABS.glob("*.ipynb")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_committed_without_outputs_with_badge_and_parameters(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs in {cell.source[:60]!r}"
    assert BADGE.format(name) in notebook.cells[0].source
    assert notebook.metadata.kernelspec.name == "python3"
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert '"google.colab" in sys.modules' in first_code.source and "jax.devices()" in first_code.source
    parameters = notebook.cells[_parameters_index(notebook)].source
    assert f'OUT_DIR = "colab_outputs/{name}"' in parameters
    assert all(f"{key} =" in parameters for key in CASES[name][0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_and_saves_its_figures(name, tmp_path, kernel_env, request):
    from nbclient import NotebookClient

    overrides, pngs = CASES[name]
    notebook = _read(name)
    parameters = notebook.cells[_parameters_index(notebook)].source
    values = {key: value for key, value in TINY.items() if f"{key} =" in parameters}
    values.update(overrides, OUT_DIR=str(tmp_path / "out"))
    if name == "learning_dynamics":
        values["WORKDIR"] = str(request.getfixturevalue("smoke_run"))
    notebook = with_parameters(notebook, values)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=kernel_env)  # raises CellExecutionError, with the traceback, if a cell fails

    for png in pngs:
        path = tmp_path / "out" / f"{png}.png"
        assert path.is_file(), f"{name} did not write {path}"
        assert np.asarray(Image.open(path).convert("RGB"), np.float32).std() > 0, f"{path} is blank"
    shown = sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))
    drawn = [png for png in pngs if "/" not in png]  # by the notebook's show() (the others by an analysis' report)
    assert shown >= len(drawn), f"{name} displayed {shown} images but drew {len(drawn)} figures"
