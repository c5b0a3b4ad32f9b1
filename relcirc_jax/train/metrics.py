"""Metric output: TensorBoard event files (workdir/tb) plus one JSON row per call in workdir/metrics.jsonl.

Only the primary process (usually process 0) writes; the others get a writer that does nothing. The workdir may be a
cloud path (gs://...): every file goes through etils.epath, and TensorBoard's writer handles gs:// itself (it needs
the google-cloud-storage package there).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from etils import epath
from PIL import Image


class MetricWriter:
    """Scalars, images and text for one run directory."""

    def __init__(self, workdir, *, is_primary: bool = True):
        self.is_primary = is_primary
        self.workdir = epath.Path(workdir)
        self._tb = None
        if is_primary:
            from tensorboardX import SummaryWriter  # imported here so non-primary hosts need not touch TB

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(logdir=str(self.workdir / "tb"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.is_primary:
            return
        row = {"step": int(step), **{name: float(value) for name, value in values.items()}}
        for name, value in row.items():
            if name != "step":
                self._tb.add_scalar(name, value, row["step"])
        self._tb.flush()
        _append_line(self.workdir / "metrics.jsonl", json.dumps(row))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """`image` is uint8 [H, W, 3]; also saved as workdir/samples/{name}_{step:08d}.png."""
        if not self.is_primary:
            return
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"Image {name!r} must be uint8 [H, W, 3], got {image.dtype} {image.shape}. "
                "Fix: convert with np.clip(x * 255, 0, 255).astype(np.uint8)."
            )
        self._tb.add_image(name, image, int(step), dataformats="HWC")
        self._tb.flush()
        samples = self.workdir / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        with (samples / f"{name.replace('/', '_')}_{int(step):08d}.png").open("wb") as f:
            Image.fromarray(image).save(f, format="PNG")

    def text(self, step: int, name: str, text: str) -> None:
        if not self.is_primary:
            return
        self._tb.add_text(name, text, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _append_line(path: epath.Path, line: str) -> None:
    """Appends `line` to a local file; cloud objects cannot be appended to, so there the file is rewritten whole."""
    if "://" not in str(path):
        with path.open("a") as f:
            f.write(line + "\n")
        return
    previous = path.read_text() if path.exists() else ""
    path.write_text(previous + line + "\n")
