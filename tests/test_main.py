"""The command line: train, then sample and evaluate from the checkpoint; every user mistake ends in one line that names
it and the fix, before any slow work and without writing anything."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from relcirc_jax import analysis
from relcirc_jax import main as cli
from relcirc_jax.analysis.groups import TEXT_ROLES
from relcirc_jax.config import base_config
from relcirc_jax.errors import UserError
from relcirc_jax.evaluation import DETECTORS, METRICS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"--config={REPO}/configs/rte_dit_nano.py:smoke"


def run_cli(workdir, mode, *extra):
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["main", CONFIG, f"--workdir={workdir}", f"--mode={mode}", *extra])
    cli.main(["main"])


def parse_as_the_cli(monkeypatch, *args):
    """Parses `args` as `python -m relcirc_jax.main` does, `--config.*` overrides included (ml_collections reads
    those from sys.argv, which `run_cli`'s direct parse does not set)."""
    cli.FLAGS.unparse_flags()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", ["main", *args])
        cli.parse_flags(["main", *args])


@pytest.fixture
def trained(smoke_run):
    return smoke_run


def sample_prompts(workdir, prompts: list[str]):
    """Samples `prompts` through the CLI; the path of the .npz it wrote (the one file of step 4 holding them)."""
    run_cli(workdir, "sample", *(f"--prompt={p}" for p in prompts))
    paths = [p for p in (workdir / "samples").glob("sample_00000004_*.npz") if list(np.load(p)["captions"]) == prompts]
    assert len(paths) == 1, paths
    return paths[0]


def test_train_then_sample_writes_grid_and_images(trained):
    run_cli(trained, "sample")  # the fixed prompt grid
    grid = trained / "samples" / "sample_00000004.npz"
    written = grid.read_bytes()
    path = sample_prompts(trained, ["red circle is above blue square", "blue square is left of red circle"])
    with np.load(path) as data:
        assert data["images"].shape == (2, 64, 64, 3) and data["images"].dtype == np.uint8
    assert path.with_suffix(".png").exists() and grid.read_bytes() == written  # other prompts: the grid is kept


def test_inf_lifts_the_time_budget_and_the_saved_config_says_null(trained, tmp_path, caplog, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)  # already at its last step: the command resumes, writes its config, trains none
    parse_as_the_cli(
        monkeypatch, CONFIG, f"--workdir={workdir}", "--mode=train", "--config.train.time_budget_minutes=inf"
    )
    assert cli.FLAGS.config.train.time_budget_minutes == float("inf")
    with caplog.at_level("INFO", logger="absl"):  # after flag parsing, which sets absl's level
        cli.main(["main"])
    config = json.loads((workdir / "config.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert config["train"]["time_budget_minutes"] is None and "nothing to train" in caplog.text


def test_two_sample_runs_draw_the_same_images(trained):
    prompts = ["red circle is above blue square", "blue triangle is below red circle"]
    images = []
    for _ in range(2):
        with np.load(sample_prompts(trained, prompts)) as data:
            images.append(data["images"])
    np.testing.assert_array_equal(images[0], images[1])
    assert images[0].std() > 0  # not a constant image


def test_evaluate_writes_both_detectors_tables_and_what_it_judged(trained):
    run_cli(trained, "evaluate")
    report = json.loads((trained / "eval.json").read_text())
    assert (report["step"], report["prompt_set"], report["negative"]) == (4, "paper_main", "empty_prompt")
    assert set(report["tables"]) == set(DETECTORS)
    for table in report["tables"].values():
        assert table["num_prompts"] == table["num_images"] == 8 and set(table["overall"]) == set(METRICS)
        assert sum(row["n"] for row in table["per_relation"].values()) == 8
    # the same sampler, seeds and prompts as the training run's periodic evaluation at step 4
    logged = [
        json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines() if "eval/overall" in line
    ]
    assert logged[-1]["step"] == 4
    assert {m: logged[-1][f"eval/{m}"] for m in METRICS} == report["tables"]["relcirc"]["overall"]
    markdown = (trained / "eval.md").read_text()
    assert "relcirc detector" in markdown and "paper detector" in markdown and "| all | 8 |" in markdown
    assert "Spatial Relation = spatial_relationship_loose" in markdown
    with np.load(trained / "eval_samples.npz") as judged:
        assert judged["images"].shape == (8, 64, 64, 3) and len(judged["captions"]) == 8
        assert judged["relcirc/overall"].dtype == bool and judged["paper/spatial_relationship"].shape == (8,)
    for detector in DETECTORS:
        grid = np.asarray(Image.open(trained / f"eval_grid_{detector}.png"))
        assert grid.ndim == 3 and grid.std() > 10  # tiles with boxes and verdict banners, not a blank image


def test_evaluate_an_earlier_step_and_a_missing_step(trained):
    run_cli(trained, "evaluate", "--step=2")
    assert json.loads((trained / "eval.json").read_text())["step"] == 2
    with pytest.raises(UserError, match=r"No checkpoint of step 3 .*available steps: \[2, 4\]"):
        run_cli(trained, "evaluate", "--step=3")


@pytest.mark.parametrize("mode", ["sample", "evaluate"])
def test_missing_checkpoint_says_train_first(tmp_path, mode):
    with pytest.raises(UserError, match=f"No checkpoint in {tmp_path}.*Train first"):
        run_cli(tmp_path, mode)
    assert os.listdir(tmp_path) == []


def test_analyze_writes_arrays_figures_and_summary_of_every_kind(trained, capsys):
    run_cli(trained, "analyze")
    for kind in analysis.KINDS:
        directory = trained / "analysis" / kind
        assert f"{kind}: {directory}" in capsys.readouterr().out or (directory / "summary.md").exists()
        with np.load(directory / f"{kind}.npz") as arrays:
            assert len(arrays.files) > 0
        figures = sorted(directory.glob("*.png"))
        assert figures, kind
        for figure in figures:
            assert np.asarray(Image.open(figure).convert("L")).std() > 0, figure
        assert (directory / "summary.md").read_text().startswith("# ")


def test_analyze_diversity_writes_the_frontier_on_paired_seeds(trained):
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["main", CONFIG, f"--workdir={trained}", "--mode=analyze"])
    cli.FLAGS.config.analysis.kind = "diversity"
    cli.main(["main"])
    directory = trained / "analysis" / "diversity"
    summary = (directory / "summary.md").read_text()
    # the PixArt DiT has no contextual space: its analogue and the image-side control run; at eta 0 both are plain CFG
    for name in ("pseudo_repulsion", "image_repulsion"):
        assert f"{name} at eta 0 vs CFG 4.5: identical images" in summary
    assert "| repulsion |" not in summary
    for method in ("cfg", "interval", "pg", "cads", "pseudo_repulsion", "image_repulsion"):
        assert f"| {method} |" in summary
    with np.load(directory / "diversity.npz") as arrays:
        assert arrays["cfg_accuracy"].shape == (2,) and np.isfinite(arrays["reference_vs_m"])
    for name in ("frontier", "sample_grid"):
        assert np.asarray(Image.open(directory / f"{name}.png").convert("L")).std() > 0


def test_the_probe_refuses_a_pixart_dit_before_loading_it(trained):
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["main", CONFIG, f"--workdir={trained}", "--mode=analyze"])
    cli.FLAGS.config.analysis.kind = "probe"
    with pytest.raises(UserError, match="reads an MM-DiT's text stream.*PixArt DiT.*Fix: analyze an MM-DiT"):
        cli.main(["main"])
    assert not (trained / "analysis" / "probe").exists()


def test_an_mmdit_trains_samples_and_evaluates_through_the_same_cli(trained, tmp_path, caplog):
    from relcirc_jax import pretrained

    # Trained by distillation from the smoke PixArt DiT (another architecture, the same captions).
    teacher = pretrained.export(trained, tmp_path / "teacher")
    config = f"--config={REPO}/configs/mmdit_rte_dit_nano.py:smoke"
    for mode in ("train", "evaluate"):
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["main", config, f"--workdir={tmp_path}", f"--mode={mode}"])
        cli.FLAGS.config.train.teacher = str(teacher)
        with caplog.at_level("INFO", logger="absl"):  # after flag parsing, which sets absl's level
            cli.main(["main"])
    assert f"Distilling from the teacher {teacher} (DiTConfig, " in caplog.text
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["step"] == 4 and report["tables"]["relcirc"]["num_images"] == 8
    assert json.loads((tmp_path / "config.json").read_text())["model"]["arch"] == "mmdit"
    assert pretrained.load_config(str(pretrained.export(tmp_path, tmp_path / "student")))[0].train.teacher is None
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["main", config, f"--workdir={tmp_path}", "--mode=analyze"])
    for kind in ("synopsis", "qk_screen", "ablation", "diversity"):  # joint attention; the text stream
        cli.FLAGS.config.analysis.kind = kind
        cli.main(["main"])
    with np.load(tmp_path / "analysis" / "ablation" / "ablation.npz") as arrays:  # one kind of head: joint
        assert arrays["masks"].shape[1:] == (1, 2, 2) and arrays["effect_map_zero"].shape[:3] == (1, 2, 2)
        assert arrays["set_masks_zero"].shape == (10, 1, 2, 2)  # baseline, the QK screen's top 2, 8 random pairs
    with np.load(tmp_path / "analysis" / "synopsis" / "synopsis.npz") as arrays:
        assert arrays["relation_score"].shape == (2, 2) and arrays["cross"].shape[-2:] == (3, len(TEXT_ROLES))
    assert "joint" in (tmp_path / "analysis" / "ablation" / "summary.md").read_text()
    assert "joint-attention (attn) head" in (tmp_path / "analysis" / "qk_screen" / "summary.md").read_text()
    diversity = tmp_path / "analysis" / "diversity"
    assert "repulsion at eta 0 vs CFG 4.5: identical images" in (diversity / "summary.md").read_text()
    assert "## Which caption tokens move (D3)" in (diversity / "summary.md").read_text()
    with np.load(diversity / "diversity.npz") as arrays:
        assert arrays["token_moves_share"].sum() == pytest.approx(1.0) and arrays["token_moves_share"][0] == 0  # pad
        assert arrays["token_moves_relative"][0] == 0 and np.nanmax(arrays["token_moves_relative"]) > 0
    assert "| move / norm % |" in (diversity / "summary.md").read_text()
    assert np.asarray(Image.open(diversity / "token_moves.png").convert("L")).std() > 0


SAMPLES_4 = ["--config.sample.num_prompts=4", "--config.eval.batch_size=4"]


def test_a_reference_model_exported_from_a_run_is_sampled_and_trained_from(trained, tmp_path, caplog, monkeypatch):
    from relcirc_jax import pretrained

    reference = pretrained.export(trained, tmp_path / "model")
    # no --config: the model's own, which an override still changes
    parse_as_the_cli(
        monkeypatch, f"--workdir={tmp_path / 'w'}", "--mode=sample", f"--init_from={reference}", *SAMPLES_4
    )
    cli.main(["main"])
    with np.load(tmp_path / "w" / "samples" / "sample_00000004.npz") as data:
        assert data["images"].std() > 0 and len(data["images"]) == 4  # the smoke config samples 8
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["main", CONFIG, f"--workdir={tmp_path / 't'}", f"--init_from={reference}"])
    with caplog.at_level("INFO", logger="absl"):  # after flag parsing, which sets absl's level
        cli.main(["main"])
    assert f"Initialised the weights and their EMA from the reference model {reference}" in caplog.text


def test_init_transfer_trains_another_text_encoder_from_every_reference_weight_that_fits(trained, tmp_path, caplog):
    from relcirc_jax import pretrained

    reference = pretrained.export(trained, tmp_path / "model")

    def parse(workdir, mode, transfer=True, depth=2):
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["main", CONFIG, f"--workdir={workdir}", f"--mode={mode}", f"--init_from={reference}"])
        cli.FLAGS.config.text.dim = 48  # another text encoder: the caption projection's input layer differs
        cli.FLAGS.config.init_transfer = transfer
        cli.FLAGS.config.model.depth = depth

    def run(*args, **kwargs):
        parse(*args, **kwargs)
        cli.main(["main"])

    with pytest.raises(UserError, match=r"text.dim: 48 vs 32.*--config.init_transfer=True for another text encoder"):
        run(tmp_path / "plain", "train", transfer=False)
    with pytest.raises(UserError, match="init_transfer=True loads only part of .*Fix: train first"):
        run(tmp_path / "t", "sample")
    parse(tmp_path / "t", "train")
    with caplog.at_level("INFO", logger="absl"):  # after flag parsing, which sets absl's level
        cli.main(["main"])
    assert "init_transfer: kept the random init of caption_projection/linear_1/kernel, y_embedding." in caplog.text
    run(tmp_path / "t", "sample")  # from the run's own checkpoint now
    with np.load(tmp_path / "t" / "samples" / "sample_00000004.npz") as data:
        assert data["images"].std() > 0
    exported = pretrained.export(tmp_path / "t", tmp_path / "transferred")  # a model of its own, used as it is
    exported_config = pretrained.load_config(str(exported))[0]
    assert (exported_config.init_from, exported_config.init_transfer) == (None, False)
    with pytest.raises(UserError, match=r"model.depth: 3 vs 2.*pick the matching config file\.$"):
        run(tmp_path / "deeper", "train", depth=3)


def test_transfer_takes_each_reference_weight_of_the_same_name_and_shape_and_keeps_the_rest():
    from relcirc_jax.pretrained import transfer

    init = {"a": {"kernel": np.zeros((2, 3), np.float32)}, "b": np.zeros(4, np.float32), "c": np.zeros(1, np.float32)}
    reference = {"a": {"kernel": np.ones((2, 3))}, "b": np.ones(5), "extra": np.ones(2)}
    merged, fresh = transfer(reference, init)
    assert fresh == ["b", "c"]
    np.testing.assert_array_equal(merged["a"]["kernel"], np.ones((2, 3)))
    assert merged["a"]["kernel"].dtype == np.float32 and merged["b"] is init["b"] and merged["c"] is init["c"]


def test_cpu_devices_splits_the_host_cpu_in_a_fresh_process(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relcirc_jax.main",
            CONFIG,
            f"--workdir={tmp_path}",
            "--config.parallel.cpu_devices=2",
            "--config.train.num_steps=2",
            "--config.eval.every_steps=1000",
            "--config.sample.every_steps=1000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on mesh {'data': 2, 'fsdp': 1, 'model': 1}" in result.stderr  # conftest's XLA_FLAGS alone would give 8


def test_cpu_devices_cannot_change_a_running_jax():
    import jax

    jax.devices()  # start JAX here, so the test does not rely on an earlier one having done it
    config = base_config("rte", "nano", "smoke")
    config.parallel.cpu_devices = 8  # what JAX already runs with (conftest): nothing to change
    cli.apply_runtime_options(config)
    config.parallel.cpu_devices = 3
    with pytest.raises(
        ValueError,
        match=r"parallel.cpu_devices=3 cannot take effect: JAX already started with 8 CPU "
        r"devices.*fresh process",
    ):
        cli.apply_runtime_options(config)


def _workdir_with_a_checkpoint_dir(path):
    (path / "checkpoints" / "2").mkdir(parents=True)  # saved_steps reads names only: enough for --step checks
    return path


def _a_file(path):
    path.write_text("not a directory")
    return path


# (case, workdir maker, arguments after --workdir, the words the one line must hold). Workdir makers get a fresh path.
BAD_INPUTS = [
    ("missing config file", None, ["--config=configs/nope.py"], "Config file 'configs/nope.py' does not exist"),
    (
        "misspelt variant",
        None,
        [f"{CONFIG}x"],
        "Unknown config variant 'smokex'; use one of 'cpu', 'cpu32', 'long', 'quick', 'smoke'",
    ),
    (
        "unknown key",
        None,
        [CONFIG, "--config.train.learning_rate=0.1"],
        "--config.train.learning_rate: train has no key 'learning_rate'; its keys are [",
    ),
    (
        "wrong-typed value",
        None,
        [CONFIG, "--config.train.lr=fast"],
        "--config.train.lr=fast: train.lr takes a float (e.g. 0.001), not 'fast'",
    ),
    ("invalid value", None, [CONFIG, "--config.train.lr=-1"], "Invalid config: train.lr=-1.0 must be > 0."),
    (
        "unknown prompt word",
        None,
        [CONFIG, "--mode=sample", "--prompt=red hexagon is above blue square"],
        "--prompt: Unknown word 'hexagon' in caption 'red hexagon is above blue square'; the vocabulary is",
    ),
    ("missing checkpoint", None, [CONFIG, "--mode=evaluate"], "No checkpoint in {workdir}/checkpoints. Train first"),
    (
        "missing step",
        _workdir_with_a_checkpoint_dir,
        [CONFIG, "--mode=sample", "--step=3"],
        "No checkpoint of step 3 in {workdir}/checkpoints; available steps: [2]. Fix: pass one of them to --step",
    ),
    ("workdir is a file", _a_file, [CONFIG], "--workdir={workdir} is a file, not a directory; pass a directory"),
    (
        "no config",
        None,
        ["--mode=sample"],
        "Pass --config=configs/<model>.py[:variant], or --init_from=pretrained/NAME",
    ),
    (
        "missing reference model",
        None,
        ["--init_from=pretrained/nope", "--mode=evaluate"],
        "No reference model 'pretrained/nope': expected a directory with model.safetensors and config.json",
    ),
    (
        "config of another model",
        None,
        [CONFIG, "--init_from=rte_dit_micro", "--mode=sample"],
        "--config and --init_from=rte_dit_micro describe different models (",
    ),
    (
        "overrides without a config",
        None,
        ["--config.eval.cfg_scale=3.0", "--mode=sample"],
        "--config.eval.cfg_scale overrides a value of a config, but no config was given. Fix: add --config=",
    ),
    (
        "override of a reference model's size",
        None,
        ["--init_from=rte_dit_micro", "--config.model.depth=2", "--mode=sample"],
        "--config and --init_from=rte_dit_micro describe different models (model.depth: 2 vs 6). Fix: drop --config",
    ),
    (
        "a flag the mode does not read",
        None,
        [CONFIG, "--mode=evaluate", "--prompt=red circle is above blue square"],
        "--prompt is read by --mode=sample only, not --mode=evaluate. Fix: drop it",
    ),
    ("step with train", None, [CONFIG, "--step=2"], "--step picks the checkpoint to sample, evaluate or analyze;"),
    ("a stray argument", None, [CONFIG, "evaluate"], "Unexpected arguments ['evaluate']. Fix: pass options as"),
    (
        "unknown bf16 matmul switch",  # the :cpu variants read it while the config is built, inside absl's parsing
        None,
        ["--config=configs/rte_dit_micro.py:cpu"],
        "RELCIRC_CPU_BF16_MATMUL='yes' is unknown. Fix: set it to 0 (XLA's dot), 1 (a gemm library on any CPU), mkl or",
    ),
]
# The environment a case runs with, beyond the test's own.
CASE_ENVIRONMENT = {"unknown bf16 matmul switch": {"RELCIRC_CPU_BF16_MATMUL": "yes"}}


@pytest.mark.parametrize("case, make_workdir, args, expected", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, case, make_workdir, args, expected):
    workdir = make_workdir(tmp_path / "w") if make_workdir else tmp_path / "w"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user runs it: JAX probes for TPUs
    env.update(CASE_ENVIRONMENT.get(case, {}))
    result = subprocess.run(
        [sys.executable, "-m", "relcirc_jax.main", f"--workdir={workdir}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr[-3000:]
    assert result.stderr.startswith("Error: ") and expected.format(workdir=workdir) in result.stderr, result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_verbosity_shows_the_traceback_of_a_user_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "relcirc_jax.main", f"--workdir={tmp_path}", CONFIG, "--mode=evaluate", "--verbosity=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError: No checkpoint" in result.stderr
