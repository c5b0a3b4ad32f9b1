"""The accuracy-vs-diversity study's own arithmetic (analysis/frontier.py): the distance above the CFG frontier, the
bootstrap over prompts and the per-setting metrics on rendered scenes whose layouts are known."""

from types import SimpleNamespace

import independent_scenes
import numpy as np
import pytest

from relcirc_jax.analysis import frontier
from relcirc_jax.analysis.repulsion import RepulsionConfig
from relcirc_jax.config import base_config
from relcirc_jax.config_checks import validate_config
from relcirc_jax.errors import UserError
from relcirc_jax.evaluation.scoring import score_specs
from relcirc_jax.models.arch import model_config


def test_frontier_gap_interpolates_the_cfg_sweep_at_equal_accuracy():
    cfg = [{"accuracy": 0.2, "vs_m": 2.0}, {"accuracy": 0.6, "vs_m": 1.0}, {"accuracy": 0.4, "vs_m": float("nan")}]
    points = [{"accuracy": 0.4, "vs_m": 1.8}, {"accuracy": 0.9, "vs_m": 2.5}, {"accuracy": 0.3, "vs_m": float("nan")}]
    gap = frontier.frontier_gap(points, cfg)
    assert gap[0] == pytest.approx(0.3) and np.isnan(gap[1]) and np.isnan(gap[2])
    assert np.isnan(frontier.frontier_gap(points, cfg[:1])).all()  # one usable CFG point: no frontier


def test_bootstrap_interval_brackets_the_mean_and_skips_nan():
    values = np.array([0.0, 1.0, np.nan, 0.5, 0.25, 0.75])
    low, high = frontier.bootstrap(values)
    assert low <= np.nanmean(values) <= high and 0 <= low < high <= 1
    assert all(np.isnan(frontier.bootstrap(np.full(3, np.nan))))


def test_point_metrics_on_scenes_from_another_renderer():
    """Eight scenes drawn by the independent PIL renderer (tests/independent_scenes.py), as 2 prompts x 1 group of 4:
    the evaluator passes them, and VS_m is near its maximum 3 for spread-out layouts and exactly 1 for a group of
    four copies of one image."""
    images, specs, _ = independent_scenes.scenes(0, 8, size=64, degraded=False, anchor="bbox")
    point = frontier.point_metrics(images, score_specs(images, specs), specs, 2, 1, 4, "unique_binding")
    assert point["accuracy"] == 1.0 and point["insufficient"] == 0.0 and 2.0 < point["vs_m"] <= 3.0
    copies = np.repeat(images[[0, 4]], 4, axis=0)
    copy_specs = [specs[0]] * 4 + [specs[4]] * 4
    collapsed = frontier.point_metrics(copies, score_specs(copies, copy_specs), copy_specs, 2, 1, 4, "unique_binding")
    assert collapsed["vs_m"] == pytest.approx(1.0, abs=1e-4)
    assert collapsed["pixel_vendi"] == pytest.approx(1.0, abs=1e-3)


def test_bad_diversity_settings_are_named():
    config = base_config("rte", "nano", "smoke")
    config.analysis.diversity_grid = "huge"
    config.analysis.diversity_metric = "color"
    config.model.arch = "unet"
    with pytest.raises(UserError) as error:
        validate_config(config, num_devices=1, process_count=1)
    for text in ("diversity_grid='huge' is unknown", "diversity_metric='color' is unknown", "model.arch='unet'"):
        assert text in str(error.value)


@pytest.mark.parametrize("arch", ["mmdit", "pixart"])
def test_the_grid_names_each_method_setting_once_with_its_ablations(arch):
    """Only the method list (no sampling): names, labels, the window-major order, the ablations' configs."""
    model = SimpleNamespace(config=base_config("rte", "micro", arch=arch), model_cfg=model_config(arch, "micro"))
    grid = frontier.GRIDS["full"]
    by_name = {m["name"]: m for m in frontier.methods(model, grid, group_size=4)}
    contextual = "repulsion" if arch == "mmdit" else "pseudo_repulsion"
    variants = {f"{contextual}[{v}]" for v in ("M10", "cond_only", "no_relation", "objects", "padding")} | (
        {"repulsion[attn_out]", "repulsion[text_and_image]"} if arch == "mmdit" else set()
    )
    assert set(by_name) == {"cfg", "interval", "pg", "cads", contextual, "image_repulsion"} | variants
    main = by_name[contextual]
    target = "text" if arch == "mmdit" else "pseudo_text"
    assert main["generate"]["repulsion"] == RepulsionConfig(target=target)
    assert len(main["labels"]) == len(set(main["labels"])) == 1 + 6 * 3 * 4  # eta 0, then eta x tau x blocks
    assert main["labels"][1:4] == ["eta=0.02 tau=1 blocks=all", "eta=0.05 tau=1 blocks=all", "eta=0.1 tau=1 blocks=all"]
    for name in variants:
        repulsion = by_name[name]["generate"]["repulsion"]
        assert repulsion != main["generate"]["repulsion"], name  # each ablation changes the method's config
        assert by_name[name]["knobs"]["repulsion_eta"].tolist() == pytest.approx([0.1, 0.2, 0.5])
    assert all(m["generate"]["group_size"] == 4 for m in by_name.values())
