"""A diffusers PixArt checkpoint (written here: 2 layers, 128 px, interpolation scale 2, T5 captions) through the
CLI with --init_from: its sizes replace the config's, it samples, and every analysis runs on it; a latent-space one
is refused everywhere but the weights-only qk_screen, with the fix named."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_checkpoints
from PIL import Image

from relcirc_jax import analysis, hf_weights, pretrained
from relcirc_jax.models import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"--config={REPO}/configs/t5_dit_nano.py:smoke"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart")
    latent = tiny_checkpoints.tiny_pixart(root / "latent", in_channels=4)
    return tiny_checkpoints.tiny_t5(root / "t5"), tiny_checkpoints.tiny_pixart(root / "pixart"), latent


def run_cli(workdir, mode, *flags, expect_error: str | None = None):
    """The CLI as a user runs it (config overrides are parsed from the real command line); with `expect_error`, the
    command must fail with exit status 2 and that (regex) in its one-line error."""
    command = [sys.executable, "-m", "relcirc_jax.main", f"--workdir={workdir}", f"--mode={mode}", *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    if expect_error is None:
        assert result.returncode == 0, result.stderr[-3000:]
        return result
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(expect_error, result.stderr), result.stderr[-3000:]
    return result


def test_the_checkpoint_sizes_replace_the_configs(checkpoints):
    _, pixart, _ = checkpoints
    config, params = pretrained.load(pixart)
    m = config.model
    assert (m.hidden_size, m.depth, m.num_heads, m.patch_size, m.in_channels) == (32, 2, 2, 16, 3)
    assert config.data.image_size == 128 and m.prediction == "eps"
    want, _ = convert.load_pixart_checkpoint(pixart)
    assert want.pos_interpolation_scale == 2
    assert params["transformer_blocks_1"]["attn2"]["to_q"]["kernel"].shape == (32, 32)


def test_sample_and_every_analysis_of_a_pixart_checkpoint(checkpoints, tmp_path):
    t5, pixart, _ = checkpoints
    flags = (CONFIG, f"--config.text.t5_path={t5}", f"--init_from={pixart}")
    run_cli(tmp_path, "sample", *flags, "--prompt=red circle is above blue square")
    [path] = (tmp_path / "samples").glob("sample_00000000_*.npz")
    with np.load(path) as data:
        assert data["images"].shape == (1, 128, 128, 3) and data["images"].std() > 0
    run_cli(tmp_path, "analyze", *flags)
    for kind in analysis.KINDS:
        if kind == "dynamics":  # a checkpoint from elsewhere has no training history here
            assert not (tmp_path / "analysis" / kind).exists()
            continue
        directory = tmp_path / "analysis" / kind
        with np.load(directory / f"{kind}.npz") as arrays:
            assert arrays.files, kind
        assert all(np.asarray(Image.open(f).convert("L")).std() > 0 for f in directory.glob("*.png")), kind
        assert (directory / "summary.md").read_text().startswith("# ")
    assert (
        "Chosen heads ablated together vs 8 random sets"
        in (tmp_path / "analysis" / "ablation" / "summary.md").read_text()
    )
    report = (tmp_path / "analysis" / "report.md").read_text()  # every summary in one document
    assert report.startswith("# Circuit analyses") and report.count("\n## ") >= len(analysis.KINDS) - 1
    with np.load(tmp_path / "analysis" / "qk_screen" / "qk_screen.npz") as qk:
        assert qk["head_score"].shape == (2, 2)


def test_a_pixart_checkpoint_needs_a_config_naming_its_encoder(checkpoints, tmp_path):
    _, pixart, _ = checkpoints
    run_cli(tmp_path, "analyze", f"--init_from={pixart}", expect_error="brings no text encoder.*--config.text.t5_path")


def test_a_latent_pixart_only_gets_the_weights_only_screen(checkpoints, tmp_path):
    t5, _, latent = checkpoints
    flags = (CONFIG, f"--config.text.t5_path={t5}", f"--init_from={latent}")
    run_cli(tmp_path, "sample", *flags, expect_error="4 input channels.*kind=qk_screen")
    run_cli(tmp_path, "analyze", *flags, "--config.analysis.kind=qk_screen")
    assert (tmp_path / "analysis" / "qk_screen" / "summary.md").exists()


def test_learned_null_negative_needs_the_checkpoints_null_caption(checkpoints, tmp_path):
    """diffusers drops PixArt's y_embedding, so a learned-null CFG negative would be the random one convert draws."""
    from safetensors.numpy import save_file

    from relcirc_jax.config import base_config
    from relcirc_jax.errors import UserError

    _, pixart, _ = checkpoints
    config = base_config("t5", "b")
    config.sample.negative = "learned_null"
    with pytest.raises(UserError, match="no learned null caption.*--config.sample.negative=empty_prompt"):
        pretrained.pixart_config(config, pixart)
    with_null = tmp_path / "with_null"
    with_null.mkdir()
    (with_null / "config.json").write_text((Path(pixart) / "config.json").read_text())
    state = hf_weights.read_weights(pixart, names=(convert.WEIGHT_FILE,))
    null = np.ones((8, state["caption_projection.linear_1.weight"].shape[1]), np.float32)
    save_file({**state, convert.NULL_CAPTION: null}, str(with_null / convert.WEIGHT_FILE))
    assert pretrained.pixart_config(config, with_null).sample.negative == "learned_null"
    config.sample.negative = "empty_prompt"
    assert pretrained.pixart_config(config, pixart).model.depth == 2
