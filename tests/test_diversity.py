"""relcirc_jax.analysis.diversity: the Vendi score against a float64 numpy reference, its gap-free custom VJP, the
layout vectors read by the evaluator, the generator's reference law and the layout metrics on toy inputs with known
answers. JAX stays float32 (x64 is never enabled); float64 lives in numpy only."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relcirc_jax.analysis import diversity
from relcirc_jax.data import prompts, scenes
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES, SceneSpec
from relcirc_jax.evaluation.scoring import score_specs

QS = (0.5, 1.0, 2.0)


def numpy_vendi(x, kernel, q, bandwidth=None):
    """exp(H_q) of the eigenvalues of K / N, all in float64 (eigenvalues <= 1e-12 dropped: 0 log 0 = 0)."""
    x = np.asarray(x, np.float64)
    if kernel == "cosine":
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        k = unit @ unit.T
    else:
        d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
        if bandwidth is None:
            bandwidth = np.median(np.sqrt(d2[np.triu_indices(len(x), 1)]))
        k = np.exp(-d2 / (2 * bandwidth**2))
    lam = np.linalg.eigvalsh(k / len(x))
    lam = lam[lam > 1e-12]
    if q == 1:
        return math.exp(-(lam * np.log(lam)).sum())
    if q == math.inf:
        return 1 / lam.max()
    return math.exp(math.log((lam**q).sum()) / (1 - q))


ALL_QS = (0.0, 0.5, 1.0, 2.0, math.inf)


@jax.jit
def all_scores(x, weights):
    """vendi_score of x for every (kernel, q) of KERNELS x ALL_QS, and with `weights`: [2, 2, 5] in one compile."""
    return jnp.stack(
        [
            jnp.stack(
                [jnp.stack([diversity.vendi_score(x, k, q, weights=w) for q in ALL_QS]) for k in diversity.KERNELS]
            )
            for w in (None, weights)
        ]
    )


ONES = np.ones(6, np.float32)


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32)


def test_vendi_matches_float64_reference(features):
    got = np.asarray(all_scores(features, ONES))
    for i, kernel in enumerate(diversity.KERNELS):
        for j, q in enumerate(ALL_QS[1:], start=1):
            assert got[0, i, j] == pytest.approx(numpy_vendi(features, kernel, q), rel=2e-5), (kernel, q)
    assert got[0, 0, 0] == pytest.approx(6.0)  # q = 0: exp(log rank)
    np.testing.assert_allclose(got[0], got[1], rtol=1e-6)  # uniform weights = no weights
    assert float(diversity.log_vendi(features)) == pytest.approx(math.log(got[0, 0, 2]), abs=1e-5)
    fixed = float(diversity.vendi_score(features, "rbf", 1.0, bandwidth=2.5))
    assert fixed == pytest.approx(numpy_vendi(features, "rbf", 1.0, bandwidth=2.5), rel=2e-5)


def test_vendi_of_identical_and_orthogonal_samples():
    same = np.tile(np.arange(1.0, 7.0, dtype=np.float32), (6, 1))
    np.testing.assert_allclose(np.asarray(all_scores(same, ONES)), 1.0, atol=1e-5)  # every kernel and q
    orthogonal = np.eye(6, dtype=np.float32) * np.arange(1.0, 7.0, dtype=np.float32)[:, None]
    np.testing.assert_allclose(np.asarray(all_scores(orthogonal, ONES))[0, 0], 6.0, rtol=1e-5)  # cosine, every q
    far = np.eye(5, dtype=np.float32) * 100.0  # rbf: pairwise distance 141 >> bandwidth 1 -> K = I
    assert float(diversity.vendi_score(far, "rbf", bandwidth=1.0)) == pytest.approx(5.0, rel=1e-5)


def test_cosine_is_scale_invariant_and_weights_select_samples(features):
    scales = np.array([0.01, 1.0, 3.0, 100.0, 0.5, 7.0], np.float32)[:, None]
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    base = np.asarray(all_scores(features, mask))
    scaled = np.asarray(all_scores(features * scales, mask))
    np.testing.assert_allclose(scaled[:, 0], base[:, 0], rtol=1e-5)  # cosine, with and without weights
    kept = features[mask > 0]
    for i, kernel in enumerate(diversity.KERNELS):
        for j, q in enumerate(ALL_QS[1:], start=1):
            assert base[1, i, j] == pytest.approx(numpy_vendi(kept, kernel, q), rel=2e-5), (kernel, q)


def test_rbf_bandwidth_rules(features):
    d = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))[np.triu_indices(6, 1)]
    assert float(diversity.rbf_bandwidth(features)) == pytest.approx(np.median(d), rel=1e-5)
    pg = np.sqrt(np.median(d) ** 2 / np.log(5) / 2)
    assert float(diversity.rbf_bandwidth(features, rule="pg")) == pytest.approx(pg, rel=1e-5)
    assert float(diversity.rbf_bandwidth(np.zeros((4, 3), np.float32))) == 1.0  # all coincide: any sigma


def numpy_entropy_grad(x, kernel, q, bandwidth=None, h=1e-6):
    """Central differences of log numpy_vendi in float64."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    f = lambda z: math.log(numpy_vendi(z, kernel, q, bandwidth))
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (f(up) - f(down)) / (2 * h)
    return grad


GRAD_BANDWIDTH = 1.5  # rbf gradients at a fixed bandwidth: the median heuristic is a constant for gradients


def plain_entropy(z, kernel, q):
    """H_q with autodiff straight through eigvalsh and no clamping: exact when eigenvalues are distinct and > 0."""
    lam = jnp.linalg.eigvalsh(diversity.kernel_matrix(z, kernel, bandwidth=GRAD_BANDWIDTH) / z.shape[0])
    return -jnp.sum(lam * jnp.log(lam)) if q == 1 else jnp.log(jnp.sum(lam**q)) / (1 - q)


def renyi2(z):
    """q = 2 without eigh: -log sum rho_ij^2, whose autodiff is exact even with repeated eigenvalues."""
    rho = diversity.kernel_matrix(z) / z.shape[0]
    return -jnp.log(jnp.sum(rho * rho))


@jax.jit
def all_grads(x):
    """Gradients of log_vendi (custom VJP) and of the plain / eigh-free references, one compile per shape."""
    ours = {
        (k, q): jax.grad(lambda z: diversity.log_vendi(z, k, q, bandwidth=GRAD_BANDWIDTH))(x)
        for k in diversity.KERNELS
        for q in QS + (math.inf,)
    }
    plain = {(k, q): jax.grad(lambda z: plain_entropy(z, k, q))(x) for k in diversity.KERNELS for q in QS}
    return ours, plain, jax.grad(renyi2)(x)


def test_custom_vjp_matches_autodiff_and_finite_differences():
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)  # full rank: distinct eigenvalues > 0
    ours, plain, eigh_free = all_grads(x)
    for kernel in diversity.KERNELS:
        bandwidth = None if kernel == "cosine" else GRAD_BANDWIDTH
        for q in QS:
            got = np.asarray(ours[kernel, q])
            np.testing.assert_allclose(got, np.asarray(plain[kernel, q]), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got, numpy_entropy_grad(x, kernel, q, bandwidth), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours["cosine", 2.0]), np.asarray(eigh_free), rtol=1e-4, atol=1e-6)
    # Rank-deficient (N > D, exact zero eigenvalues): still accurate against float64 finite differences.
    low_rank = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    got = np.asarray(jax.grad(lambda z: diversity.log_vendi(z))(low_rank))
    np.testing.assert_allclose(got, numpy_entropy_grad(low_rank, "cosine", 1.0), rtol=1e-3, atol=1e-5)


def test_gradient_is_finite_for_duplicated_samples():
    x = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
    x[1] = x[0]
    x[4] = x[3]
    same = np.tile(x[:1], (5, 1))
    # Plain autodiff: log of the (+-1e-7 noisy) zero eigenvalues of identical samples gives NaN / inf.
    plain_same = all_grads(same)[1]
    assert not all(np.all(np.isfinite(np.asarray(g))) for g in plain_same.values())
    for z in (x, same):
        ours, _, eigh_free = all_grads(z)
        for key, g in ours.items():
            assert np.all(np.isfinite(np.asarray(g))), key
        np.testing.assert_allclose(np.asarray(ours["cosine", 2.0]), np.asarray(eigh_free), rtol=1e-4, atol=1e-6)
    ours_same = all_grads(same)[0]
    for q in QS + (math.inf,):
        assert np.abs(np.asarray(ours_same["cosine", q])).max() < 1e-4, q  # all alike: no preferred direction


def test_jit_and_vmap():
    x = np.random.default_rng(3).normal(size=(3, 5, 4)).astype(np.float32)
    batched = jax.jit(jax.vmap(lambda f: diversity.vendi_score(f, "rbf", 2.0)))(x)
    for b in range(3):
        assert float(batched[b]) == pytest.approx(numpy_vendi(x[b], "rbf", 2.0), rel=2e-5)
    with pytest.raises(ValueError, match="kernel"):
        diversity.vendi_score(x[0], "linear")
    with pytest.raises(ValueError, match="q must be"):
        diversity.vendi_score(x[0], "cosine", -1.0)


def test_layouts_from_images_read_the_rendered_centres():
    rng = np.random.default_rng(4)
    n, size = 6, 64
    shape_idx = np.stack([np.arange(n) % 3, (np.arange(n) + 1) % 3], axis=1)
    color_idx = np.tile([0, 1], (n, 1))
    centers = scenes.sample_centers(rng, shape_idx, size=size)
    images = scenes.render(shape_idx, color_idx, centers, size=size)
    relations = scenes.relation_index(centers, size=size)
    wrong = (relations + 1) % len(RELATIONS)
    wrong[relations == 0] = 1  # above -> below
    specs = [
        SceneSpec(SHAPES[s1], COLORS[0], RELATIONS[r if i % 2 == 0 else w], SHAPES[s2], COLORS[1])
        for i, ((s1, s2), r, w) in enumerate(zip(shape_idx, relations, wrong))
    ]
    images[5] = images[5][:, ::-1] * 0 + 128  # a blank canvas: nothing to find
    features, valid, correct = diversity.layouts_from_images(images, [prompts.caption(s) for s in specs])
    assert features.shape == (n, 4) and features.dtype == np.float32
    np.testing.assert_allclose(features[:5], centers[:5].reshape(5, 4) / size, atol=0.3 / size)
    np.testing.assert_array_equal(valid, [True] * 5 + [False])
    assert np.isnan(features[5]).all()
    np.testing.assert_array_equal(correct, [True, False, True, False, True, False])


def test_identically_described_objects_are_put_in_relation_order():
    scores = {"centers": np.array([[40.0, 10.0, 20.0, 40.0]]), "overall": np.array([True])}
    spec = [SceneSpec("circle", "red", "lower_left", "circle", "red")]  # true in the swapped order only
    features, valid, correct = diversity.layouts_from_scores(scores, 64, specs=spec)
    np.testing.assert_allclose(features[0] * 64, [20.0, 40.0, 40.0, 10.0])
    assert valid[0] and correct[0]
    other = [SceneSpec("circle", "red", "lower_left", "square", "red")]  # different objects: keep the binding
    np.testing.assert_allclose(diversity.layouts_from_scores(scores, 64, specs=other)[0][0] * 64, [40, 10, 20, 40])


@pytest.mark.parametrize("task", ["paper", "balanced"])
def test_reference_layouts_follow_the_generator_law(task):
    n, size, radius = 400, 64, 8
    for caption in ("red square is above blue circle", "blue circle is to the lower right of red triangle"):
        spec = prompts.parse(caption).spec
        layouts = diversity.reference_layouts(caption, n, seed=1, task=task)
        assert layouts.shape == (n, 4) and layouts.dtype == np.float32
        centers = layouts.reshape(n, 2, 2) * size
        assert np.all(scenes.relation_index(centers, size=size) == RELATIONS.index(spec.relation))
        assert centers.min() >= radius + 1 - 1e-3 and centers.max() <= size - radius - 1 + 1e-3
        assert len(np.unique(layouts, axis=0)) == n
    # "paper": no overlap rejection, so under "above" x1 - x2 is uniform-ish within the 2.5 px threshold and
    # both y spread over the canvas.
    layouts = diversity.reference_layouts("red square is above blue circle", 4000, seed=2) * size
    assert np.abs(layouts[:, 0] - layouts[:, 2]).max() <= 2.5 + 1e-4
    assert np.mean(layouts[:, 1]) == pytest.approx(32 - (46 / 6), abs=1.0)  # E[min of two uniforms on [9, 55]]


def test_matched_size_vendi_and_enc_on_toy_groups():
    far = np.array([[0.1, 0.1, 0.9, 0.9], [0.9, 0.1, 0.1, 0.9], [0.1, 0.9, 0.9, 0.1], [0.5, 0.5, 0.2, 0.2]])
    same = np.tile(far[:1], (4, 1))
    features = np.stack([far, same, far, far]).astype(np.float32)
    features[3, 3] = np.nan  # an undetected, incorrect sample
    correct = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    vs = diversity.matched_size_vendi(features, correct, 3)
    np.testing.assert_allclose(vs[[0, 1, 3]], [3.0, 1.0, 3.0], rtol=1e-4)
    assert np.isnan(vs[2])  # only 2 correct: insufficient
    sampled = diversity.matched_size_vendi(features, correct, 3, max_subsets=2, seed=5)  # random-subset mode
    np.testing.assert_allclose(sampled[[0, 1, 3]], [3.0, 1.0, 3.0], rtol=1e-4)
    assert np.isnan(sampled[2])
    enc = diversity.effective_number_of_layouts(features, correct)
    np.testing.assert_allclose(enc, [4.0, 1.0, 2.0, 3.0], rtol=1e-4)
    none = diversity.effective_number_of_layouts(features[:1], np.zeros((1, 4), bool))
    np.testing.assert_array_equal(none, [0.0])
    summary = diversity.group_diversity(features, correct, 3)
    assert summary["vs_m"] == pytest.approx(7.0 / 3.0, rel=1e-4)
    assert summary["insufficient"] == 0.25 and summary["accuracy"] == pytest.approx(12 / 16)
    assert summary["enc"] == pytest.approx(2.5, rel=1e-4)


def test_reference_ceiling_is_within_bounds():
    ceiling = diversity.reference_ceiling("red square is above blue circle", group_size=4, m=3, num_groups=64)
    assert 1.0 <= ceiling["vs_m"] <= 3.0 and 1.0 <= ceiling["enc"] <= 4.0
    tight = diversity.reference_ceiling("red square is above blue circle", num_groups=64, sigma=10.0)
    assert tight["vs_m"] == pytest.approx(1.0, abs=0.01)  # a huge length scale sees every layout as the same


def test_the_reference_goes_through_the_evaluator_as_every_method_does():
    """Exact renders of the generator's law, read by score_specs: overlapping objects fail the evaluator, so a
    perfect model's accuracy on a straight relation is well below 1, and the ceiling reports it (finding 1)."""
    caption = "red circle is to the left of the blue square"
    spec = prompts.parse(caption).spec
    images, specs = diversity.reference_scenes(caption, 64, seed=3)
    layouts = diversity.reference_layouts(caption, 64, seed=3)
    np.testing.assert_array_equal(images, scenes.render(
        np.tile([SHAPES.index("circle"), SHAPES.index("square")], (64, 1)), np.tile([0, 1], (64, 1)),
        layouts.reshape(64, 2, 2) * 64,
    ))  # fmt: skip
    assert specs == [spec] * 64
    features, correct = diversity.measured_reference(caption, 64, seed=3)
    expected = diversity.layouts_from_scores(score_specs(images, specs), 64, specs=specs)
    np.testing.assert_array_equal(features, expected[0])
    np.testing.assert_array_equal(correct, expected[2])
    assert 0.4 < correct.mean() < 0.95
    ceiling = diversity.reference_ceiling(caption, num_groups=32)
    assert 0.4 < ceiling["accuracy"] < 0.95 and ceiling["enc"] < 3.5
    good = diversity.correct_reference_layouts(caption, 40, seed=5)
    assert good.shape == (40, 4) and np.isfinite(good).all()  # evaluator centres of images it passed
    assert np.all(scenes.relation_index(good.reshape(40, 2, 2) * 64) == RELATIONS.index(spec.relation))


def test_marginal_metrics_on_toy_layouts():
    rng = np.random.default_rng(6)
    ref = rng.uniform(0.2, 0.8, size=(300, 4))
    same_law = rng.uniform(0.2, 0.8, size=(300, 4))
    assert diversity.mmd2(ref, ref, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    assert abs(diversity.mmd2(ref, ref)) < 2.0 / len(ref)
    assert abs(diversity.mmd2(same_law, ref)) < 0.01
    assert diversity.knn_precision_recall(ref, ref) == (1.0, 1.0)
    assert diversity.knn_coverage(ref, ref) == 1.0
    precision, recall = diversity.knn_precision_recall(same_law, ref)
    assert precision > 0.5 and recall > 0.5

    cluster_a = rng.normal(0.2, 0.001, size=(50, 4))
    cluster_b = rng.normal(0.8, 0.001, size=(60, 4))
    assert diversity.mmd2(cluster_a, cluster_b) == pytest.approx(2.0, abs=0.01)
    assert diversity.knn_precision_recall(cluster_a, cluster_b) == (0.0, 0.0)
    assert diversity.knn_coverage(cluster_a, cluster_b) == 0.0
    # half of the reference missed (mode dropping): precision stays 1, recall and coverage ~ 1/2
    both = np.concatenate([cluster_a, cluster_b])
    precision, recall = diversity.knn_precision_recall(cluster_b, both)
    assert precision == 1.0 and recall == pytest.approx(60 / 110)
    assert diversity.knn_coverage(cluster_b, both) == pytest.approx(60 / 110)
    with pytest.raises(ValueError, match="finite"):
        diversity.mmd2(np.full((3, 4), np.nan), ref)


def test_knn_balls_reach_the_kth_nearest_other_point():
    """Reference points 0, 1, 3, 7 on a line: with k = 2 their balls reach 3, 2, 3 and 6 (k = 1: 1, 1, 2, 4). A
    generated point at 5.5 lies in the balls of 3 (distance 2.5) and 7 (1.5), not of 0 or 1."""
    reference = np.array([[0.0], [1.0], [3.0], [7.0]]) * [1.0, 0.0]  # on the x axis of a 2-D layout space
    generated = np.array([[5.5, 0.0]])
    assert diversity.knn_coverage(generated, reference, k=2) == 0.5
    assert diversity.knn_coverage(generated, reference, k=1) == 0.25
    # precision: of 11, 14 and 20 only 11 lies in a reference ball (7's, radius 6)
    far = np.array([[11.0, 0.0], [14.0, 0.0], [20.0, 0.0]])
    assert diversity.knn_precision_recall(far, reference, k=2)[0] == pytest.approx(1 / 3)


def test_cell_coverage():
    lo, hi = 9 / 64, 55 / 64
    step = (hi - lo) / 4
    centres = lo + step * (np.arange(4) + 0.5)  # the middle of each of the 4 columns
    row = np.stack([centres, np.full(4, centres[0]), np.zeros(4), np.zeros(4)], axis=1)
    features = np.stack([row, np.tile(row[:1], (4, 1)), row]).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(diversity.occupied_cells(features, mask), [4, 1, 2])
    np.testing.assert_array_equal(diversity.occupied_cells(features + 1.0, mask), [1, 1, 1])  # clipped to an edge
    assert diversity.expected_occupied_cells(np.tile(row[:1], (10, 1)), 4) == pytest.approx(1.0)
    uniform = np.array([[lo + step * (i + 0.5), lo + step * (j + 0.5), 0, 0] for i in range(4) for j in range(4)])
    expected = diversity.expected_occupied_cells(uniform, np.array([1, 2, 100]))
    np.testing.assert_allclose(expected, [1.0, 16 * (1 - (15 / 16) ** 2), 16 * (1 - (15 / 16) ** 100)])


def test_offset_midpoint_and_pixel_features():
    offset, midpoint = diversity.offset_and_midpoint(np.array([[0.2, 0.4, 0.6, 0.8]]))
    np.testing.assert_allclose(offset, [[-0.4, -0.4]])
    np.testing.assert_allclose(midpoint, [[0.4, 0.6]])
    images = np.full((2, 64, 64, 3), 255, np.uint8)
    images[1, :32] = 0
    pixels = diversity.pixel_features(images)
    assert pixels.shape == (2, 32 * 32 * 3) and pixels.max() == 1.0
    assert float(diversity.vendi_score(pixels)) == pytest.approx(numpy_vendi(pixels, "cosine", 1.0), rel=1e-4)
