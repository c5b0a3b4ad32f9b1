"""Early stops that keep the work: a SIGTERM (preemption) or a spent wall-clock budget; the loop saves and stops.

On several processes each host may receive SIGTERM at a different step, so the stop decision goes through JAX's
preemption sync point (set up by `jax.distributed.initialize`), which makes every host stop at the same step; the time
budget follows process 0's clock for the same reason.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionFlag:
    """`.requested` turns True once SIGTERM arrived; `.should_stop(step)` is the multi-host-safe check."""

    def __init__(self):
        self.requested = False

    def _on_sigterm(self, signum, frame):
        del frame
        logging.warning("Received signal %d: will save a checkpoint and stop at the next step.", signum)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def install_sigterm_handler() -> PreemptionFlag:
    """Installs a SIGTERM handler (single-process runs; multi-host uses JAX's own notifier) and returns its flag."""
    flag = PreemptionFlag()
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, flag._on_sigterm)
    return flag


class TimeBudget:
    """`.spent(step)` turns True once `minutes` of wall time have passed since construction (None or inf: never;
    inf is how a command line lifts a config's budget, as it cannot type None).

    One process reads its clock at every step. On several processes the answer is a collective (process 0's clock
    decides, so all stop at the same step), taken only at steps that are multiples of `sync_every`; others say False.
    """

    def __init__(self, minutes: float | None, *, sync_every: int = 1, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._sync_every = sync_every
        self._deadline = None if minutes is None or math.isinf(minutes) else clock() + 60.0 * minutes

    def seconds_left(self) -> float | None:
        """Wall seconds until the deadline on this process's clock (None: no budget)."""
        return None if self._deadline is None else max(self._deadline - self._clock(), 0.0)

    def spent(self, step: int) -> bool:
        if self._deadline is None:
            return False
        if jax.process_count() == 1:
            return self._clock() >= self._deadline
        if step % self._sync_every:
            return False
        return bool(multihost_utils.broadcast_one_to_all(np.asarray(self._clock() >= self._deadline)))
