"""Realistic damage for scene images, so tests and benchmarks can check the detector beyond clean renders.

Blur (Gaussian, sigma = size / 64 px), a +-20 % per-image, per-channel colour cast, additive Gaussian noise
(sigma 0.05 on the [0, 1] scale) and JPEG-like speckles: small random-coloured 1-3 px square blocks.
"""

import numpy as np
from scipy import ndimage

BLUR_SIGMA_AT_64 = 1.0
NOISE_SIGMA = 0.05
COLOR_CAST = 0.2
SPECKLES_PER_64PX_IMAGE = 8
MAX_SPECKLE_PX = 3


def degrade(images_uint8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8[N, H, W, 3] -> damaged uint8[N, H, W, 3] (blur, colour cast, noise, speckles)."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"degrade expects uint8 images [N, H, W, 3], got {images.dtype}{list(images.shape)}")
    n, h, w, _ = images.shape
    sigma = BLUR_SIGMA_AT_64 * w / 64
    x = ndimage.gaussian_filter(images.astype(np.float32) / 255, sigma=(0, sigma, sigma, 0), mode="nearest")
    x *= rng.uniform(1 - COLOR_CAST, 1 + COLOR_CAST, size=(n, 1, 1, 3)).astype(np.float32)
    x += rng.normal(0, NOISE_SIGMA, size=x.shape).astype(np.float32)
    out = np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)
    _add_speckles(out, rng)
    return out


def _add_speckles(images: np.ndarray, rng: np.random.Generator) -> None:
    """Paint square blocks of side 1..3 px in uniform random colours, in place."""
    n, h, w, _ = images.shape
    per_image = max(1, round(SPECKLES_PER_64PX_IMAGE * h * w / 64**2))
    count = n * per_image
    image = np.repeat(np.arange(n), per_image)
    side = rng.integers(1, MAX_SPECKLE_PX + 1, size=count)
    top = rng.integers(0, h - MAX_SPECKLE_PX + 1, size=count)
    left = rng.integers(0, w - MAX_SPECKLE_PX + 1, size=count)
    color = rng.integers(0, 256, size=(count, 3), dtype=np.uint8)
    dy, dx = np.divmod(np.arange(MAX_SPECKLE_PX**2), MAX_SPECKLE_PX)
    inside = (dy[None] < side[:, None]) & (dx[None] < side[:, None])  # [count, 9]
    which, cell = np.nonzero(inside)
    images[image[which], top[which] + dy[cell], left[which] + dx[cell]] = color[which]
