"""The layout probes of diagnostic D1 (analysis/probe.py): the cross-validated ridge R^2 against scikit-learn doing
the same fits, on planted and on empty signals; the per-prompt centring; the pooling of the streams."""

import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from relcirc_jax.analysis import probe


def _data(signal: float, n_prompts=12, per_prompt=6, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    prompt = np.repeat(np.arange(n_prompts), per_prompt)
    layouts = rng.uniform(0, 1, (len(prompt), 4))
    mixing = rng.standard_normal((4, dim))
    features = signal * layouts @ mixing + rng.standard_normal((len(prompt), dim)) + 3 * prompt[:, None]
    targets = probe.centre_per_prompt(layouts, prompt)
    return probe.centre_per_prompt(features, prompt), targets, prompt % probe.FOLDS


def _sklearn_fit_predict(features, targets, train, predict_rows, scale):
    scaler = StandardScaler().fit(features[train])
    z = scaler.transform(features[train])
    ridge = Ridge(alpha=scale * np.trace(z.T @ z) / z.shape[1], fit_intercept=False).fit(z, targets[train])
    return ridge.predict(scaler.transform(features[predict_rows]))


def _sklearn_r2(features, targets, fold):
    """Nested cross-validation with scikit-learn's scaler and ridge: the penalty chosen on the training folds."""
    prediction = np.zeros_like(targets)
    for k in range(probe.FOLDS):
        inner = [j for j in range(probe.FOLDS) if j != k]
        sse = [
            sum(
                np.sum((targets[fold == j] - _sklearn_fit_predict(
                    features, targets, (fold != k) & (fold != j), fold == j, scale)) ** 2)
                for j in inner
            )
            for scale in probe.RIDGE_GRID
        ]  # fmt: skip
        best = probe.RIDGE_GRID[int(np.argmin(sse))]
        prediction[fold == k] = _sklearn_fit_predict(features, targets, fold != k, fold == k, best)
    return 1 - np.sum((targets - prediction) ** 2) / np.sum(targets**2)


def test_cross_validated_r2_equals_scikit_learn_and_separates_signal_from_noise():
    results = {}
    for signal in (0.0, 3.0):
        for per_prompt, dim in ((6, 10), (3, 10), (3, 60)):  # 72 or 36 samples; 60 features > a fold's 27 rows
            features, targets, fold = _data(signal, per_prompt=per_prompt, dim=dim)
            ours = float(probe.cross_validated_r2(jnp.float32(features), jnp.float32(targets), jnp.asarray(fold)))
            assert abs(ours - _sklearn_r2(features, targets, fold)) < 2e-3
            results[signal, per_prompt, dim] = ours
    assert min(v for k, v in results.items() if k[0] == 3.0) > 0.7, results
    # No signal: R^2 stays near 0 even with few samples (a fixed penalty of 0.1 gave -0.96 on 36 x 10 here).
    assert all(abs(v) < 0.1 for k, v in results.items() if k[0] == 0.0), results


def test_r2_is_computed_for_every_leading_index_at_once():
    stacked, r2s = [], []
    for seed in range(3):
        features, targets, fold = _data(2.0, seed=0)
        features = features + 0.5 * seed * np.random.default_rng(seed).standard_normal(features.shape)
        stacked.append(features)
        r2s.append(float(probe.cross_validated_r2(jnp.float32(features), jnp.float32(targets), jnp.asarray(fold))))
    batched = probe.cross_validated_r2(jnp.float32(np.stack(stacked).reshape(3, 1, *features.shape)),
                                       jnp.float32(targets), jnp.asarray(fold))  # fmt: skip
    assert batched.shape == (3, 1)
    np.testing.assert_allclose(np.asarray(batched)[:, 0], r2s, rtol=1e-4, atol=1e-5)


def test_centring_per_prompt_leaves_each_prompt_mean_zero():
    values = np.random.default_rng(0).standard_normal((2, 9, 3)) + 5
    prompt = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    centred = probe.centre_per_prompt(values, prompt)
    for p in range(3):
        np.testing.assert_allclose(centred[:, prompt == p].mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(centred[:, 1] - centred[:, 0], values[:, 1] - values[:, 0])


def test_streams_are_pooled_over_valid_caption_tokens_and_all_image_tokens():
    rng = np.random.default_rng(0)
    cache = {}
    for layer in range(2):
        cache[f"blocks.{layer}.hook_context_post"] = jnp.float32(rng.standard_normal((3, 5, 4)))
        cache[f"blocks.{layer}.hook_resid_post"] = jnp.float32(rng.standard_normal((3, 7, 4)))
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    pooled = probe.reduce_streams(cache, {"mask": jnp.asarray(mask)})
    assert pooled["text"].shape == pooled["image"].shape == (3, 2, 4)
    for row in range(3):
        np.testing.assert_allclose(
            pooled["text"][row, 1], np.asarray(cache["blocks.1.hook_context_post"])[row, mask[row]].mean(0), rtol=1e-6
        )
    np.testing.assert_allclose(pooled["image"][:, 0], np.asarray(cache["blocks.0.hook_resid_post"]).mean(1), rtol=1e-6)


def test_the_probe_summary_goes_into_the_analysis_report(tmp_path):
    from relcirc_jax.analysis import write_index

    for kind in ("synopsis", "diversity", "probe"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "summary.md").write_text(f"# {kind} summary\n\nbody of {kind}\n")
    report = write_index(tmp_path, "model", {"probe": 1.5}).read_text()
    assert report.index("body of synopsis") < report.index("body of diversity") < report.index("body of probe")
    assert "| [probe](probe/summary.md) |  | 1.5 s |" in report and "## probe summary" in report
