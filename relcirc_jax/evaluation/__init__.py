"""relcirc_jax.evaluation: find the objects in generated images and score them against their captions.

score(images, captions) / score_specs(images, specs) -> per-image metrics (see scoring.py); detect() -> the objects
(this project's detector; detect_with("paper", ...) -> the paper's OpenCV detector);
degrade() -> blurred, colour-cast, noisy, speckled copies for robustness checks.
"""

from relcirc_jax.evaluation.degrade import degrade
from relcirc_jax.evaluation.detector import Detections, detect
from relcirc_jax.evaluation.scoring import (
    DETECTORS,
    METRICS,
    PAPER_COLUMNS,
    detect_with,
    encode_specs,
    score,
    score_detections,
    score_specs,
)

__all__ = [
    "DETECTORS",
    "METRICS",
    "PAPER_COLUMNS",
    "Detections",
    "degrade",
    "detect",
    "detect_with",
    "encode_specs",
    "score",
    "score_detections",
    "score_specs",
]
