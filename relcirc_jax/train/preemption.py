"""Preemption: a SIGTERM sets a flag; the training loop checks it, saves a checkpoint and exits 0.

On several processes each host may receive SIGTERM at a different step, so the stop decision goes through JAX's
preemption sync point (set up by `jax.distributed.initialize`), which makes every host stop at the same step.
"""
from __future__ import annotations

import signal

import jax
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
