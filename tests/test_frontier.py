"""The accuracy-vs-diversity study's own arithmetic (analysis/frontier.py): the distance above the CFG frontier, the
bootstrap over prompts and the per-setting metrics on rendered scenes whose layouts are known."""

from types import SimpleNamespace

import independent_scenes
import numpy as np
import pytest

from relcirc_jax.analysis import diversity, frontier
from relcirc_jax.analysis.repulsion import RepulsionConfig
from relcirc_jax.config import base_config
from relcirc_jax.config_checks import validate_config
from relcirc_jax.data.prompts import parse
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


def _scores(centers, correct):
    """score_specs-like scores of images whose evaluator centres [N, 4] (pixels) and correctness are given."""
    return {"centers": np.asarray(centers, np.float64), "overall": np.asarray(correct, bool)}


SPREAD = np.array([[10, 10, 50, 50], [50, 10, 10, 50], [10, 50, 50, 10], [30, 30, 14, 14]], np.float64)


def _point(groups, group_size=4):
    """point_metrics of prompts x groups given as [(centres [B, 4], correct [B])] per prompt, on blank images."""
    centers = np.concatenate([c for prompt in groups for c, _ in prompt])
    correct = np.concatenate([k for prompt in groups for _, k in prompt])
    spec = parse("red square is above the blue circle").spec
    images = np.full((len(centers), 64, 64, 3), 128, np.uint8)
    specs = [spec] * len(centers)
    return frontier.point_metrics(
        images, _scores(centers, correct), specs, len(groups), len(groups[0]), group_size, "overall"
    )


def test_vs_m_is_the_mean_over_prompts_that_its_interval_estimates():
    """Prompt 0 has two sufficient groups (VS_3 = 3), prompt 1 one collapsed group (VS_3 = 1) and one with a single
    correct image: the mean over prompts is 2, the mean over groups would be 7/3 (finding 3)."""
    full = np.ones(4, bool)
    point = _point(
        [[(SPREAD, full), (SPREAD, full)], [(np.tile(SPREAD[:1], (4, 1)), full), (SPREAD, np.eye(4, dtype=bool)[0])]]
    )
    assert point["vs_m"] == pytest.approx(2.0, rel=1e-4)
    np.testing.assert_allclose(point["vs_m_prompt"], [3.0, 1.0], rtol=1e-4)
    np.testing.assert_allclose(point["accuracy_prompt"], [1.0, 5 / 8])
    assert point["vs_m_ci"][0] <= point["vs_m"] <= point["vs_m_ci"][1]
    assert [len(layouts) for layouts in point["correct_layouts"]] == [8, 5]  # per prompt, for marginal_fidelity


def test_vs_m_uses_the_pre_registered_order():
    """m = 3 for groups of 4 and m = 4 for groups of 8 (notes 7.2), or analysis.diversity_m (finding 5)."""
    from relcirc_jax import config as config_lib

    assert config_lib.diversity_m(4) == 3 and config_lib.diversity_m(8) == 4 and config_lib.diversity_m(8, 2) == 2
    for group_size, m in ((6, 0), (4, 5)):
        with pytest.raises(ValueError, match="analysis.diversity_m"):
            config_lib.diversity_m(group_size, m)
    eight = np.concatenate([SPREAD, SPREAD + 2])
    half = np.arange(8) < 4  # 4 of 8 correct: VS_4 is defined, VS_7 would not be
    point = _point([[(eight, half)]], group_size=8)
    assert point["insufficient"] == 0.0 and 3.0 < point["vs_m"] <= 4.0
    config = base_config("rte", "nano", "smoke")
    config.analysis.diversity_group_size = 6
    with pytest.raises(
        UserError, match="diversity_m=0 picks the pre-registered m, and there is none for diversity_group_size=6"
    ):
        validate_config(config, num_devices=1, process_count=1)
    config.analysis.diversity_m = 3
    validate_config(config, num_devices=1, process_count=1)


def test_marginal_fidelity_compares_each_prompt_with_its_own_law_at_a_fixed_coverage_count():
    """Two prompts with disjoint laws, each sampled exactly but one far more often (a method more accurate on one
    relation): per prompt, MMD^2 stays ~0, where pooling would weigh the prompts by their correct counts; coverage
    reads COVERAGE_POINTS layouts whatever the count; prompts with too few correct layouts are skipped (finding 2)."""
    rng = np.random.default_rng(0)
    law = lambda lo, n: rng.uniform(lo, lo + 0.2, (n, 4))  # noqa: E731
    refs = [law(0.1, 64), law(0.7, 64)]
    many, few = law(0.1, 60), law(0.7, 4)
    mmd, coverage = frontier.marginal_fidelity([many, few], refs)
    assert abs(mmd) < 0.05
    assert diversity.mmd2(np.concatenate([many, few]), np.concatenate(refs)) > 0.1  # the pooled statistic
    k = frontier.COVERAGE_POINTS
    assert frontier.marginal_fidelity([many], refs[:1])[1] == frontier.marginal_fidelity([many[:k]], refs[:1])[1]
    one = [many, law(0.7, 1)]
    assert frontier.marginal_fidelity(one, refs) == frontier.marginal_fidelity([many], refs[:1])
    assert all(np.isnan(frontier.marginal_fidelity([many[:1], few[:1]], refs)))
    assert 0 < coverage < 1


def test_the_reference_point_is_measured_as_a_method_is(monkeypatch):
    """The generator's law rendered, scored by the evaluator and summarised by point_metrics: a straight relation's
    overlapping objects make its accuracy < 1; its MMD reference holds evaluator-correct layouts (finding 1)."""
    monkeypatch.setattr(frontier, "REFERENCE_GROUPS", 4)
    monkeypatch.setattr(frontier, "REFERENCE_LAYOUTS", 12)
    prompt_list = ["red circle is to the left of the blue square", "blue square is above the red triangle"]
    ref = frontier.reference(prompt_list, 4, 64, 8, "paper", "overall")
    images = np.concatenate([diversity.reference_scenes(p, 16, seed=2 * i)[0] for i, p in enumerate(prompt_list)])
    specs = [parse(p).spec for p in prompt_list for _ in range(16)]
    same = frontier.point_metrics(images, score_specs(images, specs), specs, 2, 4, 4, "overall")
    assert ref["accuracy"] == same["accuracy"] < 1.0 and ref["vs_m"] == same["vs_m"] and ref["enc"] == same["enc"]
    for i, (p, layouts) in enumerate(zip(prompt_list, ref["layouts"])):
        np.testing.assert_array_equal(layouts, diversity.correct_reference_layouts(p, 12, seed=2 * i + 1))
    assert (ref["mmd2"], ref["coverage"]) == frontier.marginal_fidelity(same["correct_layouts"], ref["layouts"])


def _sweep_point(accuracy, vs):
    return {"accuracy": float(np.mean(accuracy)), "vs_m": float(np.mean(vs)), "accuracy_prompt": accuracy,
            "vs_m_prompt": vs}  # fmt: skip


def test_the_gap_interval_is_paired_and_the_verdict_counts_only_settings_it_separates_from_zero():
    """Prompts differ a lot in VS_m (marginal intervals overlap), but a setting that beats the CFG point of its
    accuracy on every prompt by ~0.05 has a paired interval above 0; one that matches it on average does not
    (finding 3)."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 0.5, 16)
    cfg = [_sweep_point(np.full(16, a), 2.5 + difficulty - a) for a in (0.2, 0.4, 0.6, 0.8)]
    middle = cfg[1]["vs_m_prompt"]
    better = _sweep_point(np.full(16, 0.4), middle + 0.05 + 0.01 * rng.normal(size=16))
    same = _sweep_point(np.full(16, 0.4), middle + 0.05 * (-1) ** np.arange(16))
    gaps, intervals = frontier.frontier_gap([better, same], cfg), frontier.gap_intervals([better, same], cfg)
    assert gaps[0] == pytest.approx(0.05, abs=0.01) and intervals[0][0] > 0
    assert gaps[1] == pytest.approx(0.0, abs=1e-9) and intervals[1][0] < 0 < intervals[1][1]
    marginal = [frontier.bootstrap(p["vs_m_prompt"]) for p in (better, cfg[1])]
    assert marginal[0][0] < marginal[1][1]  # the unpaired intervals overlap
    results = {"cfg": dict(labels=["a", "b", "c", "d"], points=cfg, gap=[0.0] * 4, gap_ci=[(0.0, 0.0)] * 4)}
    results["pg"] = dict(labels=["better", "same"], points=[better, same], gap=gaps, gap_ci=intervals)
    (line,) = frontier._verdict(results)
    assert "of 2 comparable settings 1 lie above it and 0 below" in line
    outside = _sweep_point(np.full(16, 0.9), middle)
    assert all(np.isnan(frontier.gap_intervals([outside], cfg)[0]))


def test_an_mmdit_of_depth_3_names_each_block_set_once():
    """The nano MM-DiT has 2 blocks with a text output: the text thirds collapse to all / first / last; the image
    thirds span all 3 blocks, "last" being the last one (finding 6)."""
    model = SimpleNamespace(config=base_config("rte", "nano", arch="mmdit"), model_cfg=model_config("mmdit", "nano"))
    by_name = {m["name"]: m for m in frontier.methods(model, frontier.GRIDS["full"], group_size=4)}
    for name, blocks in (
        ("repulsion", ("all", "first", "last")),
        ("image_repulsion", ("all", "first", "middle", "last")),
    ):
        method = by_name[name]
        assert len(method["labels"]) == len(set(method["labels"])) == 1 + 6 * 3 * len(blocks)
        assert {label.split("blocks=")[1] for label in method["labels"]} == set(blocks)
    image = by_name["image_repulsion"]
    last = image["labels"].index("eta=0.1 tau=2 blocks=last")
    assert image["knobs"]["repulsion_blocks"][last].tolist() == [0, 0, 1]
