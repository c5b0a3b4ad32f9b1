"""Checkpoints: one Orbax CheckpointManager saving the train state (any pytree of jax.Arrays) and JSON metadata.

Saves are asynchronous, atomic (Orbax writes into a temporary directory and renames it when complete) and happen
every `save_every` steps (or when forced, or at a preemption sync point). Restoring reads the newest step onto the
shardings of the abstract state it is given, so a run may resume on another mesh or device count. A failing read is
retried (a transient gs:// or NFS error is not damage); a step still unreadable after that is skipped for the previous
one, and only the training loop moves it aside (renamed, never deleted): read-only modes leave it in place.
"""

from __future__ import annotations

import logging as logging_lib
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

UNREADABLE_SUFFIX = ".unreadable"
RESTORE_ATTEMPTS = 3  # reads of one step before it counts as unreadable
RESTORE_RETRY_SECONDS = 1.0  # sleep before the first retry, doubled before each further one (1 s, 2 s)


def _absolute(path: epath.Path) -> epath.Path:
    """Orbax needs absolute paths; cloud paths (gs://...) already are."""
    return path if "://" in str(path) else path.resolve()


def _drop_orbax_info(record: logging_lib.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
        return True
    # Orbax warns of every handler it replaces; the one replacement made here is save_cpu_arrays_whole's.
    return record.levelno >= logging_lib.WARNING and not record.getMessage().startswith("Type handler registry type")


def quiet_orbax_info_logs() -> None:
    """Hides Orbax's INFO lines (about 30 per checkpoint) so the progress lines stay readable; warnings still show, but
    for Orbax's note that save_cpu_arrays_whole replaced its jax.Array handler."""
    absl_logger = logging_lib.getLogger("absl")
    if _drop_orbax_info not in absl_logger.filters:
        absl_logger.addFilter(_drop_orbax_info)


def save_cpu_arrays_whole() -> None:
    """Has Orbax save each replicated jax.Array on CPU devices from one replica, as it does on GPUs.

    Outside GPUs Orbax splits a replicated array's save among its replicas ("replica-parallel"): each device's piece is
    cut by a jitted slice, compiled once per device and array shape. On CPU devices, which all share this process's
    memory, that parallelises nothing and costs compilations: 96 of them (~5 s) in a 30-s `:smoke` run on 8 devices,
    and the checkpointing test files take a third less time without them (its checkpoint also shrinks from 4.0 to
    1.4 MB, one chunk per array instead of one per piece). The arrays restored are the same, bit for bit, and earlier
    checkpoints read as before. The handler is otherwise Orbax's default one (its array-metadata store included);
    Orbax versions that name the store differently keep their default."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    store = getattr(default, "_array_metadata_store", None)  # private; see the docstring
    if jax.default_backend() != "cpu" or store is None or not getattr(default, "_use_replica_parallel", False):
        return
    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=store, use_replica_parallel=False)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def saved_steps(directory) -> list[int]:
    """The committed checkpoint steps in `directory`, oldest first, read without creating anything (none: [])."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(child.name) for child in directory.iterdir() if child.name.isdigit())


class Checkpointer:
    """Save/restore of ("state", "meta") items in `directory` (a local path or gs://...). Creating one hides Orbax's
    INFO log lines (`quiet_orbax_info_logs`) for every mode that reads or writes checkpoints, and on CPU saves
    replicated arrays without replica-parallel slicing (`save_cpu_arrays_whole`)."""

    def __init__(self, directory, *, save_every: int, keep: int = 3, keep_period: int = 0, async_save: bool = True):
        if save_every < 1 or keep < 1 or keep_period < 0:
            raise ValueError(
                f"save_every and keep must be >= 1 and keep_period >= 0 (0: off), got save_every={save_every}, "
                f"keep={keep}, keep_period={keep_period}."
            )
        quiet_orbax_info_logs()
        save_cpu_arrays_whole()
        self.directory = _absolute(epath.Path(directory))
        policy = ocp.checkpoint_managers.AnySavePolicy(
            [
                ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,  # Orbax's off is None
            enable_async_checkpointing=async_save,
            save_decision_policy=policy,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts saving `state` and `meta` at `step` if the interval (or `force`) says so; returns whether it did.

        A step that is already on disk (e.g. the final step of a run resumed after it finished) is not saved again.
        """
        if int(step) in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._manager.save(int(step), args=args, force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def read_meta(self, step: int) -> dict | None:
        """The `meta` item of checkpoint `step` alone (no array is read); None when it cannot be read."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception:  # noqa: BLE001 - an unreadable step is the restore's business (fallback, move aside)
            return None

    def restore_latest(
        self, abstract_state: Any, *, move_aside_unreadable: bool = False
    ) -> tuple[int, Any, dict] | None:
        """Restores the newest readable step onto `abstract_state`'s shardings; None if there is no checkpoint.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set for the current mesh. A step that
        fails `RESTORE_ATTEMPTS` reads is skipped with a warning. With `move_aside_unreadable` (the training loop, which
        will save those steps again) the skipped newer steps are renamed aside; otherwise nothing on disk changes.
        """
        errors = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._restore_with_retries(step, abstract_state)
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint must fall back, not crash
                logging.warning(
                    "Checkpoint step %d in %s is unreadable (%s: %s); falling back to an older step%s.",
                    step,
                    self.directory,
                    type(error).__name__,
                    error,
                    "" if move_aside_unreadable else " and leaving it in place",
                )
                errors.append(f"step {step}: {type(error).__name__}: {error}")
                continue
            if move_aside_unreadable:
                for bad_step in sorted(self._manager.all_steps()):
                    if bad_step > step:
                        self._move_aside(bad_step)
            return step, restored.state, restored.meta
        if errors:
            raise RuntimeError(
                f"No checkpoint in {self.directory} could be restored ({'; '.join(errors)}). "
                "Fix: restore with the abstract state of the run that wrote them, or move the "
                "directory aside to start a fresh run."
            )
        return None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of exactly checkpoint `step` (no fallback: asking for a step means wanting that one)."""
        steps = sorted(self._manager.all_steps())
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {self.directory}; available steps: {steps}. "
                "Fix: pass one of them, or leave the step out for the latest."
            )
        restored = self._restore_with_retries(step, abstract_state)
        return restored.state, restored.meta

    def _restore_with_retries(self, step: int, abstract_state: Any) -> Any:
        """Orbax's restore of `step`, retried with a growing sleep; the last attempt's exception propagates."""
        for attempt in range(RESTORE_ATTEMPTS):
            try:
                return self._manager.restore(step, args=_restore_args(abstract_state))
            except Exception as error:  # noqa: BLE001 - the caller decides what a lasting failure means
                if attempt == RESTORE_ATTEMPTS - 1:
                    raise
                delay = RESTORE_RETRY_SECONDS * 2**attempt
                logging.warning(
                    "Reading checkpoint step %d in %s failed (%s: %s); retrying in %.0f s.",
                    step,
                    self.directory,
                    type(error).__name__,
                    error,
                    delay,
                )
                time.sleep(delay)

    def _move_aside(self, step: int) -> None:
        """Renames an unreadable step directory so new saves at that step are possible and nothing is lost."""
        source = self.directory / str(step)
        target = self.directory / f"{step}{UNREADABLE_SUFFIX}-{int(time.time())}"
        if jax.process_index() == 0:
            try:
                source.rename(target)
                logging.warning("Moved unreadable checkpoint %s to %s.", source, target)
            except OSError as error:  # e.g. a store without directory renames: leave it, saves resume after it
                logging.warning(
                    "Could not move unreadable checkpoint %s aside (%s); new saves up to step %d will "
                    "be skipped. Fix: move it by hand.",
                    source,
                    error,
                    step,
                )
        multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _restore_args(abstract_state: Any) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
