"""One human-readable progress line per log step: loss, grad-norm, throughput, step time and ETA (the time budget's
end when that comes first)."""

from __future__ import annotations

import time
from collections.abc import Callable

from absl import logging


def format_duration(seconds: float) -> str:
    """19m24s / 1h02m03s / 45s."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressLogger:
    """Logs every `log_every` steps; rates come from the wall time between two logged steps.

    The first `update` only starts the clock (it usually includes compilation), so its line shows no rates.
    Loss and grad-norm may be device arrays: they are only converted (and so synchronised) on log steps.
    `seconds_left` (e.g. TimeBudget.seconds_left) caps the ETA when a time budget will stop the run first.
    """

    def __init__(
        self,
        total_steps: int,
        global_batch: int,
        log_every: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        seconds_left: Callable[[], float | None] = lambda: None,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}.")
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.log_every = log_every
        self._clock = clock
        self._seconds_left = seconds_left
        self._last: tuple[int, float] | None = None

    def update(self, step: int, loss, grad_norm) -> str | None:
        """Returns (and logs) the progress line on log steps and the final step, else None."""
        first = self._last is None
        if not first and step % self.log_every and step != self.total_steps:
            return None
        now = self._clock()
        line = f"step {step}/{self.total_steps} | loss {float(loss):.4f} | grad {float(grad_norm):.3g}"
        if not first and step > self._last[0]:
            seconds_per_step = (now - self._last[1]) / (step - self._last[0])
            images_per_second = self.global_batch / seconds_per_step if seconds_per_step > 0 else float("inf")
            eta, budget_left = (self.total_steps - step) * seconds_per_step, self._seconds_left()
            if budget_left is not None and budget_left < eta:
                eta_text = f"{format_duration(budget_left)} (time budget)"
            else:
                eta_text = format_duration(eta)
            line += f" | {images_per_second:.1f} img/s | {seconds_per_step:.2f} s/step | ETA {eta_text}"
        self._last = (step, now)
        logging.info(line)
        return line
