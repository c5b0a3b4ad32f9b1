"""Sample diversity: the Vendi score (JAX, jittable, differentiable) and the layout-diversity metrics of the
contextual-repulsion study (shared/papers/contextual_repulsion_notes.md, sections 5.1, 6.4, 7.1 and 7.2).

Vendi score (Friedman & Dieng, TMLR 2023; the order-q "cousins" of Pasarkar & Dieng, AISTATS 2024). For N samples
with a positive semi-definite similarity K whose diagonal is 1, and sample weights p (uniform 1/N by default),
rho = K o sqrt(p) sqrt(p)^T (= K / N for uniform weights) has trace 1; with lambda its eigenvalues,

    H_1 = -sum lambda log lambda (0 log 0 = 0),   H_q = log(sum lambda^q) / (1 - q),   H_inf = -log max lambda

(H_0 = log rank), and VS_q = exp(H_q) lies in [1, N] (N = the number of nonzero weights): 1 when all samples are
alike, N when they are mutually dissimilar (K = I). It reads as "the effective number of distinct samples".
`log_vendi` is H_q, the quantity the repulsion ascends (notes 2.2-2.3: L_div = H_1 of the cosine kernel of the
contextual vectors).

Kernels (`kernel_matrix`): "cosine", K_ij = <x_i, x_j> / (|x_i| |x_j|) on L2-normalised features (the paper's and the
reference implementation's choice; a zero feature vector stays zero, so its row and column of K are 0 and the trace
of K / N falls short of 1: give zero rows zero weight), and "rbf", K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)) with
sigma = `bandwidth`; bandwidth None uses the median heuristic sigma = the median distance over pairs i < j (of
samples with nonzero weight; `rbf_bandwidth`, treated as a constant by gradients, as particle guidance treats its
bandwidth). rbf_bandwidth(x, rule="pg") gives particle guidance's sigma instead, sqrt(median^2 / (2 log(N - 1)))
(notes 5.2, 6.4). Distances come from the Gram matrix of the centred rows (identical rows get exactly 0). The layout
metrics use a fixed sigma = 0.1 of the canvas (notes 7.1), never the median heuristic.

Numerics (float32 throughout; notes 6.4). The entropy is a jax.custom_vjp over one `eigh` (symeig.py: Jacobi sweeps
in plain JAX ops for these small kernels, since the CPU's LAPACK call can hang a program sharded over several CPU
devices, e.g. the repulsion inside the sampler): the backward pass returns
dH/drho = U diag(g'(lambda)) U^T for H = sum g(lambda) (d tr g(rho) = tr(g'(rho) d rho)), with no 1 / (lambda_i -
lambda_j) terms, so it stays finite when eigenvalues repeat (duplicated samples: exactly the near-collapsed batches
a repulsion starts from). Eigenvalues at or below a tolerance count as zero in the value (float32 `eigh` returns
zero eigenvalues as +-1e-7 N-ish noise, which lambda^q with q < 1 would otherwise count); the default tolerance is
numpy's matrix-rank one, max(lambda) * N * eps(float32); g' is evaluated at max(lambda, tolerance), so
-log(lambda) - 1 (q = 1) and q lambda^(q-1) (q < 1) stay finite. For q = inf the gradient is u u^T of a top
eigenvector (a subgradient when the top eigenvalue repeats).

Layouts (notes 7.1): l = (x1, y1, x2, y2) / image size, the evaluator's centres of the object named first and the
one named second (`scoring.score`'s "centers"; NaN where an object was not found), so 0..1 on the canvas. For a
caption whose two objects are described identically the evaluator's binding order is arbitrary, so the layout is put
in the order in which the caption's relation holds (when only the swapped order satisfies it); this replaces the
permutation-symmetric kernel the notes suggest, which is not positive semi-definite.

Diversity metrics (notes 7.2), for groups of B samples of one prompt laid out as features [G, B, D] with a correct
mask [G, B] (a correct sample is one the evaluator passes, "overall" by default):

    matched_size_vendi            VS_m: per group, the mean Vendi over the size-m subsets of its correct samples
                                  (NaN when fewer than m are correct); in [1, m]. Diversity at fixed sample count,
                                  separated from accuracy (the primary quantity).
    effective_number_of_layouts   ENC: Vendi over the group's correct samples, 0 when none; in [0, B]. Combines
                                  accuracy and diversity: breaking the relation does not raise it.
    group_diversity               both, summarised over groups (mean VS_m over sufficient groups, the insufficient
                                  fraction, mean ENC, accuracy)
    reference_layouts             the scene generator's exact conditional law of layouts given the caption's relation
                                  (data.dataset's "paper" task: both centres uniform on [r+1, size-r-1]^2, relation
                                  derived, so rejection sampling is exact; "balanced": scenes.sample_centers)
    reference_scenes / measured_reference / correct_reference_layouts / reference_ceiling
                                  that law rendered as training scenes and read by the evaluator, as every method's
                                  images are: a perfect model's layouts and correctness (accuracy < 1 where the
                                  objects overlap), its evaluator-correct layouts (the MMD / coverage reference), and
                                  its accuracy, VS_m^ref and ENC^ref
    mmd2                          squared MMD (RBF, sigma 0.1), unbiased, between correct layouts and reference
                                  layouts (analysis/frontier.py: per prompt); ~0 when the marginals match, up to 2
    knn_precision_recall          k-NN precision and recall (Kynkaenniemi et al. 2019; k = 3): the fraction of
                                  generated layouts inside the reference manifold (union of k-NN balls), and of
                                  reference layouts inside the generated one; each in [0, 1]
    knn_coverage                  coverage of Naeem et al. 2020 (k = 3): the fraction of reference k-NN balls that
                                  hold a generated layout; in [0, 1]
    occupied_cells / expected_occupied_cells
                                  set coverage (notes 7.2): distinct cells of a grid x grid partition of the valid
                                  object-1 centre region hit per group, and its expectation for as many i.i.d. draws
                                  from a pool (the method's own pooled marginal, or the reference); in [0, grid^2]

Also `offset_and_midpoint` (the decomposition of notes 7.1: what the relation leaves free vs where the pair sits) and
`pixel_features` (32x32 RGB for the pixel-Vendi cross-check of notes 7.2, with the cosine kernel).
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from relcirc_jax.analysis import symeig
from relcirc_jax.data import scenes
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES, SceneSpec

KERNELS = ("cosine", "rbf")
LAYOUT_SIGMA = 0.1  # RBF length scale of the layout kernel, in canvas units (notes 7.1; sweep 0.05, 0.1, 0.2)
KNN_K = 3  # k of the k-NN precision / recall / coverage (Kynkaenniemi et al. 2019's default)
_CHUNK = 1024  # rows per block of the pairwise-distance loops of the numpy metrics


# ---------------------------------------------------------------------------------------------------------------------
# Kernels


def _safe_normalise(features: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm; zero rows stay zero (and get a zero, not NaN, gradient)."""
    sq = jnp.sum(features * features, axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.sqrt(jnp.where(positive, sq, 1.0))
    return jnp.where(positive, features / norm, 0.0)


def _squared_distances(features: jax.Array) -> jax.Array:
    """|x_i - x_j|^2 from the Gram matrix of the centred rows (centring keeps the float32 cancellation error relative
    to the spread, not to |x|: identical rows get exactly 0, not +-1e-7 |x|^2), clipped at 0, zero diagonal."""
    features = features - jnp.mean(features, axis=0, keepdims=True)
    sq = jnp.sum(features * features, axis=-1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (features @ features.T)
    d2 = jnp.maximum(d2, 0.0)
    return jnp.where(jnp.eye(features.shape[0], dtype=bool), 0.0, d2)


@functools.partial(jax.jit, static_argnames=("rule",))
def rbf_bandwidth(features: jax.Array, weights: jax.Array | None = None, *, rule: str = "median") -> jax.Array:
    """The data-driven RBF length scale sigma (stop-gradient) over the pairs i < j of samples with nonzero weight.

    rule "median": sigma = the median pairwise distance (the classic median heuristic: a median pair has k = e^-0.5).
    rule "pg": particle guidance's h = median^2 / log(N - 1) in k = exp(-d^2 / h), i.e. sigma = sqrt(h / 2), with N
    the number of weighted samples (N = 2 falls back to "median"). A zero median (most pairs identical) falls back
    to the largest pairwise distance, and 1 when all samples coincide (then any sigma gives K = 1).
    """
    if rule not in ("median", "pg"):
        raise ValueError(f"Unknown bandwidth rule {rule!r}; choose 'median' or 'pg'")
    features = jax.lax.stop_gradient(jnp.asarray(features))
    n = features.shape[0]
    rows, cols = np.triu_indices(n, 1)
    if rows.size == 0:
        return jnp.ones((), features.dtype)
    dist = jnp.sqrt(_squared_distances(features)[rows, cols])
    use = jnp.ones(rows.size, bool) if weights is None else (weights[rows] > 0) & (weights[cols] > 0)
    med = jnp.nanmedian(jnp.where(use, dist, jnp.nan))
    largest = jnp.max(jnp.where(use, dist, 0.0))
    sigma = jnp.where(jnp.isfinite(med) & (med > 0), med, jnp.where(largest > 0, largest, 1.0))
    if rule == "pg":
        count = n if weights is None else jnp.sum(weights > 0)
        log_n1 = jnp.log(jnp.maximum(count - 1, 1).astype(features.dtype))
        sigma = jnp.where(log_n1 > 0, sigma / jnp.sqrt(2.0 * jnp.where(log_n1 > 0, log_n1, 1.0)), sigma)
    return jax.lax.stop_gradient(sigma)


def kernel_matrix(
    features: jax.Array, kernel: str = "cosine", *, bandwidth=None, weights: jax.Array | None = None
) -> jax.Array:
    """K[N, N] of features[N, D]: "cosine" (on L2-normalised rows; scale-invariant per row) or "rbf"
    exp(-|x_i - x_j|^2 / (2 bandwidth^2)), bandwidth None = rbf_bandwidth's median heuristic over the samples with
    nonzero `weights`. Both have a unit diagonal (except cosine's zero rows)."""
    features = jnp.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {features.shape}")
    if kernel == "cosine":
        unit = _safe_normalise(features)
        return unit @ unit.T
    if kernel == "rbf":
        sigma = rbf_bandwidth(features, weights) if bandwidth is None else jnp.asarray(bandwidth, features.dtype)
        return jnp.exp(-_squared_distances(features) / (2.0 * sigma * sigma))
    raise ValueError(f"Unknown kernel {kernel!r}; choose one of {KERNELS}")


# ---------------------------------------------------------------------------------------------------------------------
# Spectral entropy with a gap-free custom VJP


def _check_q(q) -> float:
    q = float(q)
    if not q >= 0:
        raise ValueError(f"The Vendi order q must be >= 0 (or inf), got {q}")
    return q


def _tolerance(lam: jax.Array, eps: float | None) -> jax.Array:
    """Eigenvalues <= this count as zero: eps, or numpy's matrix-rank tolerance max(lambda) * N * eps(dtype)."""
    if eps is not None:
        return jnp.asarray(eps, lam.dtype)
    rank_tol = jnp.max(lam) * lam.shape[-1] * jnp.finfo(lam.dtype).eps
    return jnp.maximum(rank_tol, jnp.finfo(lam.dtype).tiny)


def _spectral_value(lam: jax.Array, q: float, tol: jax.Array) -> jax.Array:
    """sum -lambda log lambda (q = 1), max lambda (q = inf) or sum lambda^q over the eigenvalues above tol."""
    if q == math.inf:
        return jnp.max(lam)
    kept = lam > tol
    safe = jnp.where(kept, lam, 1.0)
    terms = -safe * jnp.log(safe) if q == 1.0 else safe**q
    return jnp.sum(jnp.where(kept, terms, 0.0))


def _spectral_slope(lam: jax.Array, q: float, tol: jax.Array) -> jax.Array:
    """g'(lambda) of the terms of _spectral_value, at max(lambda, tol) (finite for every q)."""
    if q == math.inf:
        return jax.nn.one_hot(jnp.argmax(lam), lam.shape[-1], dtype=lam.dtype)
    clamped = jnp.maximum(lam, tol)
    if q == 1.0:
        return -jnp.log(clamped) - 1.0
    return q * clamped ** (q - 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _spectral_sum(rho: jax.Array, q: float, eps: float | None) -> jax.Array:
    lam = symeig.eigvalsh(rho)
    return _spectral_value(lam, q, _tolerance(lam, eps))


def _spectral_sum_fwd(rho, q, eps):
    lam, vec = symeig.eigh(rho)
    tol = _tolerance(lam, eps)
    return _spectral_value(lam, q, tol), (lam, vec, tol)


def _spectral_sum_bwd(q, eps, residuals, cotangent):
    lam, vec, tol = residuals
    slope = _spectral_slope(lam, q, tol)
    return (cotangent * ((vec * slope[None, :]) @ vec.T),)  # U diag(g') U^T: no eigenvalue gaps


_spectral_sum.defvjp(_spectral_sum_fwd, _spectral_sum_bwd)


def spectral_entropy(rho: jax.Array, q: float = 1.0, *, eps: float | None = None) -> jax.Array:
    """The order-q Renyi entropy H_q of the eigenvalues of a symmetric PSD rho[N, N] of trace 1 (von Neumann
    entropy for q = 1), in [0, log N]; gradients through the custom VJP (module docstring). q static, >= 0 or inf."""
    q = _check_q(q)
    total = _spectral_sum(rho, q, eps)
    if q == 1.0:
        return total
    if q == math.inf:
        return -jnp.log(total)
    return jnp.log(total) / (1.0 - q)


def log_vendi_from_kernel(
    kernel: jax.Array, q: float = 1.0, *, weights: jax.Array | None = None, eps: float | None = None
) -> jax.Array:
    """log VS_q = H_q of rho = K o sqrt(p) sqrt(p)^T, p = weights / sum(weights) (uniform: rho = K / N); needs a
    unit diagonal on the weighted samples. Rows of zero weight drop out (Vendi of the rest)."""
    kernel = jnp.asarray(kernel)
    n = kernel.shape[0]
    if weights is None:
        rho = kernel / n
    else:
        p = jnp.asarray(weights, kernel.dtype)
        root = jnp.sqrt(p / jnp.sum(p))
        rho = kernel * root[:, None] * root[None, :]
    return spectral_entropy(rho, q, eps=eps)


@functools.partial(jax.jit, static_argnames=("kernel", "q", "eps"))
def log_vendi(
    features: jax.Array,
    kernel: str = "cosine",
    q: float = 1.0,
    *,
    bandwidth=None,
    weights: jax.Array | None = None,
    eps: float | None = None,
) -> jax.Array:
    """H_q = log VS_q of features[N, D] (see vendi_score), in [0, log N]: the objective the contextual repulsion
    ascends (its gradient is finite for duplicated samples and exactly 0 when all samples coincide)."""
    kernel_ = kernel_matrix(features, kernel, bandwidth=bandwidth, weights=weights)
    return log_vendi_from_kernel(kernel_, q, weights=weights, eps=eps)


@functools.partial(jax.jit, static_argnames=("kernel", "q", "eps"))
def vendi_score(
    features: jax.Array,
    kernel: str = "cosine",
    q: float = 1.0,
    *,
    bandwidth=None,
    weights: jax.Array | None = None,
    eps: float | None = None,
) -> jax.Array:
    """The Vendi score VS_q = exp(H_q) of features[N, D] under `kernel` ("cosine" or "rbf" with `bandwidth` sigma,
    None = median heuristic), in [1, N]: the effective number of distinct samples. q = 1 Shannon (the paper's),
    q != 1 Renyi (q = 2 = N^2 / |K|_F^2, q = inf = 1 / max lambda), q static. Optional weights[N] >= 0 (the reference
    implementation's p, with a positive sum; a 0/1 mask restricts the score to the masked samples at a fixed shape;
    zero-weight rows must still be finite). `eps`: eigenvalue tolerance (None = matrix-rank rule). Jitted;
    differentiable in features."""
    return jnp.exp(log_vendi(features, kernel, q, bandwidth=bandwidth, weights=weights, eps=eps))


# ---------------------------------------------------------------------------------------------------------------------
# Layout vectors from the evaluator


def _spec_indices(specs: list[SceneSpec]) -> dict[str, np.ndarray]:
    from relcirc_jax.evaluation.scoring import encode_specs

    return encode_specs(specs)


def _canonical_order(centers: np.ndarray, specs: list[SceneSpec], size: int) -> np.ndarray:
    """centers[N, 4] with the two objects swapped where the caption describes them identically and only the swapped
    order satisfies its (strict) relation; the evaluator accepts either order there."""
    wanted = _spec_indices(specs)
    same = (wanted["shape1"] == wanted["shape2"]) & (wanted["color1"] == wanted["color2"])
    xy = np.nan_to_num(centers).reshape(-1, 2, 2)
    found = np.isfinite(centers).all(axis=1)
    holds = scenes.relation_index(xy, size=size) == wanted["relation"]
    holds_swapped = scenes.relation_index(xy[:, ::-1], size=size) == wanted["relation"]
    swap = same & found & ~holds & holds_swapped
    out = centers.copy()
    out[swap] = centers[swap][:, [2, 3, 0, 1]]
    return out


def layouts_from_scores(
    scores: dict[str, np.ndarray], size: int, *, metric: str = "overall", specs: list[SceneSpec] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features float32[N, 4], valid bool[N], correct bool[N]) from the output of evaluation.score / score_specs.

    features = (x1, y1, x2, y2) / size, object 1 being the one the caption names first, NaN where the evaluator did
    not find an object; valid = both objects found; correct = valid & scores[metric] ("overall": colour, shape,
    unique binding and the strict relation; "overall_loose" for the loose relation). With `specs`, layouts of
    identically described objects are put in relation order (module docstring).
    """
    if metric not in scores:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {sorted(k for k in scores if k != 'centers')}")
    centers = np.asarray(scores["centers"], np.float64)
    if specs is not None:
        centers = _canonical_order(centers, specs, size)
    valid = np.isfinite(centers).all(axis=1)
    correct = valid & np.asarray(scores[metric], bool)
    return (centers / size).astype(np.float32), valid, correct


def layouts_from_images(
    images_uint8: np.ndarray,
    captions: list[str],
    *,
    detector: str = "relcirc",
    radius: float | None = None,
    metric: str = "overall",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores uint8 images [N, size, size, 3] against their captions with the evaluator (evaluation.score_specs)
    and returns layouts_from_scores' (features [N, 4], valid [N], correct [N])."""
    from relcirc_jax.data.prompts import parse
    from relcirc_jax.evaluation.scoring import score_specs

    specs = [parse(c).spec for c in captions]
    scores = score_specs(images_uint8, specs, radius=radius, detector=detector)
    return layouts_from_scores(scores, np.asarray(images_uint8).shape[1], metric=metric, specs=specs)


def offset_and_midpoint(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split layouts [..., 4] into the offset l1 - l2 ([..., 2]: how the relation is realised, in [-1, 1]) and the
    midpoint (l1 + l2) / 2 ([..., 2]: where the pair sits), for Vendi over each separately (notes 7.1)."""
    features = np.asarray(features)
    first, second = features[..., :2], features[..., 2:4]
    return first - second, (first + second) / 2


def pixel_features(images_uint8: np.ndarray, resolution: int = 32) -> np.ndarray:
    """float32[N, resolution^2 * 3]: images block-averaged to resolution x resolution, in [0, 1], flattened; with
    the cosine kernel, the pixel Vendi cross-check of notes 7.2 (no pretrained features offline). The gray
    background makes every pair fairly similar, so compare such values between methods only."""
    images = np.asarray(images_uint8)
    n, size = images.shape[0], images.shape[1]
    if size % resolution:
        raise ValueError(f"image size {size} is not a multiple of resolution {resolution}")
    f = size // resolution
    blocks = images.reshape(n, resolution, f, resolution, f, 3).astype(np.float32).mean(axis=(2, 4))
    return (blocks / 255.0).reshape(n, -1)


# ---------------------------------------------------------------------------------------------------------------------
# Reference layouts: the generator's exact conditional law


def _as_spec(caption_or_spec) -> SceneSpec:
    if isinstance(caption_or_spec, SceneSpec):
        return caption_or_spec
    if isinstance(caption_or_spec, str):
        from relcirc_jax.data.prompts import parse

        return parse(caption_or_spec).spec
    return SceneSpec(*caption_or_spec)


def reference_layouts(
    caption_or_spec, n: int, *, seed: int = 0, size: int = 64, radius: float = 8, task: str = "paper"
) -> np.ndarray:
    """float32[n, 4]: n layouts (x1, y1, x2, y2) / size drawn i.i.d. from the scene generator's conditional law of
    layouts given the caption's relation (all of them correct by construction).

    task "paper" (data.dataset's default): both centres uniform on [r+1, size-r-1]^2 (float32, as the generator
    draws them), overlaps allowed, relation derived by scenes.relation_index; rejection on the relation is then
    exact. task "balanced": scenes.sample_centers for the caption's shapes and relation (overlap > 5 % rejected).
    """
    spec = _as_spec(caption_or_spec)
    relation = RELATIONS.index(spec.relation)
    rng = np.random.default_rng(seed)
    if task == "balanced":
        shape_idx = np.tile([SHAPES.index(spec.shape1), SHAPES.index(spec.shape2)], (n, 1))
        centers = scenes.sample_centers(
            rng, shape_idx, size=size, radius=radius, relation_idx=np.full(n, relation, np.int64)
        )
        return (centers.reshape(n, 4) / size).astype(np.float32)
    if task != "paper":
        raise ValueError(f"Unknown task {task!r}; choose 'paper' or 'balanced'")
    kept, count = [], 0
    while count < n:
        draw = max(4 * 1024, 20 * (n - count))  # straight relations accept ~5 %
        candidates = rng.uniform(radius + 1, size - radius - 1, size=(draw, 2, 2)).astype(np.float32)
        ok = candidates[scenes.relation_index(candidates, size=size) == relation]
        kept.append(ok)
        count += len(ok)
    return (np.concatenate(kept)[:n].reshape(n, 4) / size).astype(np.float32)


def reference_scenes(
    caption_or_spec, n: int, *, seed: int = 0, size: int = 64, radius: float = 8, task: str = "paper"
) -> tuple[np.ndarray, list[SceneSpec]]:
    """(uint8 images [n, size, size, 3], [spec] * n): reference_layouts rendered as the training scenes are
    (scenes.render with the caption's shapes and colours, object 2 on top), i.e. the images of a model that samples
    the generator's law exactly. The caption must name both colours (every eval prompt set does)."""
    spec = _as_spec(caption_or_spec)
    if spec.color1 is None or spec.color2 is None:
        raise ValueError(f"Reference scenes need both colours named; {spec} leaves one out. Fix: name both colours.")
    layouts = reference_layouts(spec, n, seed=seed, size=size, radius=radius, task=task)
    shape_idx = np.tile([SHAPES.index(spec.shape1), SHAPES.index(spec.shape2)], (n, 1))
    color_idx = np.tile([COLORS.index(spec.color1), COLORS.index(spec.color2)], (n, 1))
    images = scenes.render(shape_idx, color_idx, layouts.reshape(n, 2, 2) * size, size=size, radius=radius)
    return images, [spec] * n


def measured_reference(
    caption_or_spec, n: int, *, seed: int = 0, size: int = 64, radius: float = 8, task: str = "paper", metric="overall"
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32[n, 4], correct bool[n]) of reference_scenes as the evaluator reads them (score_specs,
    layouts_from_scores: what every method's images go through). Where the two objects overlap the evaluator often
    fails exact renders, so the accuracy is below 1 (measured, "paper" task: 0.90 for "above", 0.71 for "left of",
    ~1 for the diagonals)."""
    from relcirc_jax.evaluation.scoring import score_specs

    images, specs = reference_scenes(caption_or_spec, n, seed=seed, size=size, radius=radius, task=task)
    features, _, correct = layouts_from_scores(score_specs(images, specs), size, metric=metric, specs=specs)
    return features, correct


def correct_reference_layouts(
    caption_or_spec, n: int, *, seed: int = 0, size: int = 64, radius: float = 8, task: str = "paper", metric="overall"
) -> np.ndarray:
    """float32[n, 4]: n layouts of measured_reference that the evaluator passes (drawn until there are n), the
    reference a method's correct layouts are compared with (MMD, coverage)."""
    rng = np.random.default_rng(seed)
    kept, count = [], 0
    while count < n:
        features, correct = measured_reference(
            caption_or_spec, 2 * n, seed=int(rng.integers(2**31)), size=size, radius=radius, task=task, metric=metric
        )
        kept.append(features[correct])
        count += int(correct.sum())
    return np.concatenate(kept)[:n]


# ---------------------------------------------------------------------------------------------------------------------
# Within-group diversity


def _check_groups(features, correct) -> tuple[np.ndarray, np.ndarray]:
    """features float32[G, B, D] with non-correct rows zeroed (they may hold NaN), correct bool[G, B]."""
    features = np.asarray(features, np.float32)
    correct = np.asarray(correct, bool)
    if features.ndim != 3 or correct.shape != features.shape[:2]:
        raise ValueError(
            f"expected features [G, B, D] and correct [G, B] (one group: add a leading axis of 1), got "
            f"{features.shape} and {correct.shape}"
        )
    return np.where(correct[..., None], features, 0.0).astype(np.float32), correct


@functools.partial(jax.jit, static_argnames=("q",))
def _subset_vendi(features, index, sigma, q):
    """Vendi (RBF sigma) of features[g, index[g, s]] for every group g and subset s: [G, S]."""
    subsets = jax.vmap(lambda f, i: f[i])(features, index)  # [G, S, m, D]
    one = lambda x: vendi_score(x, "rbf", q, bandwidth=sigma)
    return jax.vmap(jax.vmap(one))(subsets)


@functools.partial(jax.jit, static_argnames=("q",))
def _masked_vendi(features, mask, sigma, q):
    """Vendi (RBF sigma) of the masked rows of each group (uniform weights on them): [G]."""
    one = lambda x, w: vendi_score(x, "rbf", q, bandwidth=sigma, weights=w)
    return jax.vmap(one)(features, mask.astype(features.dtype))


def matched_size_vendi(
    features: np.ndarray,
    correct: np.ndarray,
    m: int,
    *,
    sigma: float = LAYOUT_SIGMA,
    q: float = 1.0,
    max_subsets: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """VS_m per group (notes 7.2, the primary quantity): the mean Vendi (RBF sigma) over the size-m subsets of the
    group's correct samples, float[G] in [1, m]; NaN for groups with fewer than m correct ("insufficient").

    features [G, B, D] (layouts), correct bool[G, B]. Exact (every subset) when C(B, m) <= max_subsets, otherwise
    the mean over max_subsets random subsets of each group's correct samples (seeded).
    """
    features, correct = _check_groups(features, correct)
    g, b = correct.shape
    if not 1 <= m <= b:
        raise ValueError(f"m must be in [1, B={b}], got {m}")
    if math.comb(b, m) <= max_subsets:
        index = np.array(list(itertools.combinations(range(b), m)), np.int32)  # [S, m]
        eligible = correct[:, index].all(axis=2)  # [G, S]
        index = np.broadcast_to(index, (g,) + index.shape)
    else:
        keys = np.random.default_rng(seed).random((g, max_subsets, b))
        keys[~np.broadcast_to(correct[:, None, :], keys.shape)] = 2.0  # incorrect samples sort last
        index = np.argsort(keys, axis=2)[:, :, :m].astype(np.int32)
        eligible = np.broadcast_to((correct.sum(1) >= m)[:, None], (g, max_subsets))
    values = np.asarray(_subset_vendi(features, index, jnp.float32(sigma), float(q)), np.float64)
    count = eligible.sum(axis=1)
    total = np.where(eligible, values, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def effective_number_of_layouts(
    features: np.ndarray, correct: np.ndarray, *, sigma: float = LAYOUT_SIGMA, q: float = 1.0
) -> np.ndarray:
    """ENC per group (notes 7.2): the Vendi (RBF sigma) of the kernel restricted to the group's correct samples,
    0 when none is correct; float[G] in [0, B]. A method cannot raise it by breaking the relation."""
    features, correct = _check_groups(features, correct)
    values = np.asarray(_masked_vendi(features, correct, jnp.float32(sigma), float(q)), np.float64)
    return np.where(correct.any(axis=1), values, 0.0)


def group_diversity(
    features: np.ndarray,
    correct: np.ndarray,
    m: int,
    *,
    sigma: float = LAYOUT_SIGMA,
    q: float = 1.0,
    max_subsets: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """The within-group summary of notes 7.2 over G groups [G, B, D] of one setting: vs_m (mean VS_m over groups with
    >= m correct; NaN if none), insufficient (fraction of groups with < m correct), enc (mean ENC), accuracy (mean
    of correct)."""
    per_group = matched_size_vendi(features, correct, m, sigma=sigma, q=q, max_subsets=max_subsets, seed=seed)
    enc = effective_number_of_layouts(features, correct, sigma=sigma, q=q)
    sufficient = np.isfinite(per_group)
    return {
        "vs_m": float(per_group[sufficient].mean()) if sufficient.any() else math.nan,
        "insufficient": float(1.0 - sufficient.mean()),
        "enc": float(enc.mean()),
        "accuracy": float(np.asarray(correct, bool).mean()),
    }


def reference_ceiling(
    caption_or_spec,
    *,
    group_size: int = 4,
    m: int = 3,
    num_groups: int = 1024,
    sigma: float = LAYOUT_SIGMA,
    q: float = 1.0,
    seed: int = 0,
    size: int = 64,
    radius: float = 8,
    task: str = "paper",
    metric: str = "overall",
) -> dict[str, float]:
    """group_diversity of num_groups groups of group_size exact renders of the generator's law, measured by the
    evaluator (measured_reference): the accuracy, VS_m^ref ("vs_m") and ENC^ref ("enc") a perfect model would score
    (notes 7.2). Report a method's VS_m / VS_m^ref for the same caption, B, m and sigma.

    Measured ("paper" task, 1024 groups, sigma 0.1, B = 4, m = 3): "above" accuracy 0.90, VS_3^ref 2.96 of 3,
    ENC^ref 3.52 of 4; "left of" 0.71, 2.94, 2.77; "upper left" 1.00, 2.97, 3.94 (B = 8, m = 4: VS_4^ref 3.91,
    3.87, 3.94). VS_m at sigma 0.1 nearly
    saturates, so it mostly measures collapse below the reference; use the sigma sweep to see over-dispersion."""
    features, correct = measured_reference(
        caption_or_spec, num_groups * group_size, seed=seed, size=size, radius=radius, task=task, metric=metric
    )
    shape = (num_groups, group_size)
    return group_diversity(features.reshape(shape + (4,)), correct.reshape(shape), m, sigma=sigma, q=q, seed=seed)


# ---------------------------------------------------------------------------------------------------------------------
# Marginal fidelity against reference layouts (numpy, float64, in row blocks)


def _as_points(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"expected finite points [N, D], got shape {x.shape} (drop rows with NaN first)")
    return x


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


def _rbf_sum(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    total = 0.0
    for start in range(0, len(a), _CHUNK):
        total += np.exp(-_pairwise_sq(a[start : start + _CHUNK], b) / (2.0 * sigma * sigma)).sum()
    return total


def mmd2(generated: np.ndarray, reference: np.ndarray, *, sigma: float = LAYOUT_SIGMA, unbiased: bool = True) -> float:
    """Squared maximum mean discrepancy between two samples [n, D] and [m, D] under the RBF kernel
    exp(-|x - y|^2 / (2 sigma^2)) (sigma 0.1 of the canvas, as the layout Vendi). 0 when the laws agree, at most 2.
    unbiased=True: the U-statistic (within-sample diagonals left out; it can be slightly negative, |.| ~ 1/n);
    False: the biased V-statistic (>= 0, exactly 0 for identical samples). Needs n, m >= 2."""
    x, y = _as_points(generated), _as_points(reference)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"mmd2 needs at least 2 points per sample, got {n} and {m}")
    kxx, kyy, kxy = _rbf_sum(x, x, sigma), _rbf_sum(y, y, sigma), _rbf_sum(x, y, sigma)
    if unbiased:
        return float((kxx - n) / (n * (n - 1)) + (kyy - m) / (m * (m - 1)) - 2.0 * kxy / (n * m))
    return float(kxx / n**2 + kyy / m**2 - 2.0 * kxy / (n * m))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest other point of the same sample."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {len(x)}")
    radii = np.empty(len(x))
    for start in range(0, len(x), _CHUNK):
        d2 = _pairwise_sq(x[start : start + _CHUNK], x)
        radii[start : start + _CHUNK] = np.sqrt(np.partition(d2, k, axis=1)[:, k])  # index 0 is the point itself
    return radii


def _inside_balls(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """bool[len(points)]: whether each point lies in some ball (centres[j], radii[j])."""
    inside = np.empty(len(points), bool)
    for start in range(0, len(points), _CHUNK):
        d2 = _pairwise_sq(points[start : start + _CHUNK], centres)
        inside[start : start + _CHUNK] = (d2 <= (radii * radii)[None, :]).any(axis=1)
    return inside


def knn_precision_recall(generated: np.ndarray, reference: np.ndarray, *, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019), Euclidean on the layout vectors, k = 3: precision =
    the fraction of generated points inside the reference manifold (the union of balls around every reference point
    reaching its k-th nearest reference neighbour), recall = the fraction of reference points inside the generated
    manifold. Each in [0, 1]; both 1 for a sample against itself, both 0 for far-apart samples."""
    x, y = _as_points(generated), _as_points(reference)
    precision = _inside_balls(x, y, _knn_radii(y, k)).mean()
    recall = _inside_balls(y, x, _knn_radii(x, k)).mean()
    return float(precision), float(recall)


def knn_coverage(generated: np.ndarray, reference: np.ndarray, *, k: int = KNN_K) -> float:
    """Coverage (Naeem et al. 2020, k = 3): the fraction of reference points whose k-NN ball (radius = distance to
    its k-th nearest reference neighbour) holds at least one generated point; in [0, 1]. Unlike recall, it does not
    grow when generated outliers inflate the generated manifold; it does grow with the number of generated points,
    so compare it at a fixed count."""
    x, y = _as_points(generated), _as_points(reference)
    radii = _knn_radii(y, k)
    covered = np.empty(len(y), bool)
    for start in range(0, len(y), _CHUNK):
        nearest = _pairwise_sq(y[start : start + _CHUNK], x).min(axis=1)
        covered[start : start + _CHUNK] = nearest <= radii[start : start + _CHUNK] ** 2
    return float(covered.mean())


# ---------------------------------------------------------------------------------------------------------------------
# Set coverage on a grid of object-1 centres


def _cells(features: np.ndarray, grid: int, size: int, radius: float) -> np.ndarray:
    """Cell index in [0, grid^2) of each layout's object-1 centre; the valid region [r+1, size-r-1]^2 (in canvas
    units) is cut into grid x grid equal cells, centres outside it go to the nearest edge cell."""
    lo, hi = (radius + 1) / size, (size - radius - 1) / size
    xy = np.asarray(features, np.float64)[..., :2]
    ij = np.clip(np.floor((xy - lo) / (hi - lo) * grid), 0, grid - 1).astype(np.int64)
    return ij[..., 1] * grid + ij[..., 0]


def occupied_cells(
    features: np.ndarray, mask: np.ndarray, *, grid: int = 4, size: int = 64, radius: float = 8
) -> np.ndarray:
    """Set coverage per group (notes 7.2): the number of distinct cells of the grid x grid partition of the valid
    object-1 centre region hit by the masked (e.g. correct) layouts of each group; int[G] in [0, min(B, grid^2)].
    features [G, B, D] (object 1's normalised centre first), mask bool[G, B]."""
    features, mask = _check_groups(features, mask)
    cells = _cells(features, grid, size, radius)
    hit = np.zeros((len(cells), grid * grid), bool)
    rows = np.broadcast_to(np.arange(len(cells))[:, None], cells.shape)
    hit[rows[mask], cells[mask]] = True
    return hit.sum(axis=1)


def expected_occupied_cells(
    pool: np.ndarray, n, *, grid: int = 4, size: int = 64, radius: float = 8
) -> np.ndarray | float:
    """The expected number of distinct cells hit by n i.i.d. draws from the empirical law of `pool` [N, D]:
    sum_c 1 - (1 - p_c)^n, p_c the pool's cell frequencies. With the method's own pooled correct layouts it is the
    i.i.d. baseline for occupied_cells (within-group repulsion should beat it); with reference_layouts, the
    reference. n may be an array (e.g. each group's number of correct samples); in [0, min(n, grid^2)]."""
    pool = _as_points(pool)
    p = np.bincount(_cells(pool, grid, size, radius), minlength=grid * grid) / len(pool)
    n_arr = np.asarray(n, np.float64)
    out = (1.0 - (1.0 - p) ** n_arr[..., None]).sum(axis=-1)
    return float(out) if out.ndim == 0 else out
