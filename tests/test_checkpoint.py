"""Checkpointer: bitwise roundtrip, replicated arrays saved without compiling slices, save interval, keep-N, restore
onto another mesh, a transient read error -> retried, corrupt latest -> fallback (moved aside only for training), and
SIGKILL during an asynchronous save -> the previous checkpoint still restores."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from run_records import assert_bitwise_equal

from relcirc_jax.parallel import make_mesh
from relcirc_jax.train import checkpoint
from relcirc_jax.train.checkpoint import Checkpointer


@pytest.fixture(autouse=True)
def no_retry_sleep(monkeypatch):
    monkeypatch.setattr(checkpoint, "RESTORE_RETRY_SECONDS", 0.0)


def _state(mesh, offset=0):
    data = NamedSharding(mesh, P("data"))
    return {
        "params": {
            "w": jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(16, 2) / 7 + offset, data),
            "b": jax.device_put(jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16), data),
        },
        "opt": {"count": jnp.int32(3 + offset)},
        "rng": jax.random.key_data(jax.random.key(offset)),
        "step": jnp.int32(offset),
    }


def _abstract(state, sharding_for):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(x)), state)


def test_roundtrip_is_bitwise_and_returns_meta(tmp_path):
    mesh = make_mesh({"data": -1})
    state = _state(mesh, offset=5)
    meta = {"step": 5, "config": {"model": {"depth": 3}, "lr": 1e-4}, "seed": 17}
    ckpt = Checkpointer(tmp_path, save_every=5)
    assert ckpt.save(5, state, meta)
    ckpt.wait()
    step, restored, restored_meta = ckpt.restore_latest(_abstract(state, lambda x: x.sharding))
    ckpt.close()
    assert step == 5 and restored_meta == meta
    assert_bitwise_equal(restored, state)
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding


def test_replicated_arrays_on_cpu_are_saved_from_one_replica_without_compiling(tmp_path, caplog):
    """Orbax's replica-parallel save cuts each replicated array into one jitted slice per device (a compilation per
    device and shape, all in the same host memory); on CPU devices the Checkpointer writes it from one replica."""
    replicated = NamedSharding(make_mesh({"data": -1}), P())
    state = {"w": jnp.arange(48.0).reshape(16, 3), "b": jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16)}
    state = jax.device_put(state, replicated)
    ckpt = Checkpointer(tmp_path, save_every=1)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        assert ckpt.save(1, state, {"step": 1})
        ckpt.wait()
    assert "Compiling" not in caplog.text and "overriding" not in caplog.text
    _, restored, _ = ckpt.restore_latest(_abstract(state, lambda x: replicated))
    ckpt.close()
    assert_bitwise_equal(restored, state)


def test_empty_directory_restores_none_and_relative_paths_work(tmp_path, monkeypatch):
    mesh = make_mesh({"data": -1})
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("fresh", save_every=1)
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(_abstract(_state(mesh), lambda x: x.sharding)) is None
    assert ckpt.save(1, _state(mesh), {"step": 1})
    ckpt.wait()
    assert (tmp_path / "fresh" / "1").is_dir()
    ckpt.close()


def test_save_every_force_and_keep_n(tmp_path):
    mesh = make_mesh({"data": -1})
    ckpt = Checkpointer(tmp_path, save_every=2, keep=2, async_save=False)
    saved = [step for step in range(1, 8) if ckpt.save(step, _state(mesh, step), {"step": step})]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, _state(mesh, 7), {"step": 7}, force=True)
    assert not ckpt.save(7, _state(mesh, 7), {"step": 7}, force=True)  # already on disk
    ckpt.wait()
    assert ckpt.latest_step() == 7
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [6, 7]
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
    writer_mesh = make_mesh({"data": -1})  # 8 devices, data parallel
    state = _state(writer_mesh, offset=2)
    ckpt = Checkpointer(tmp_path, save_every=1)
    ckpt.save(2, state, {"step": 2})
    ckpt.close()

    reader_mesh = make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[4:])  # 4 other devices, fsdp=2
    fsdp = NamedSharding(reader_mesh, P("fsdp"))
    replicated = NamedSharding(reader_mesh, P())
    abstract = _abstract(state, lambda x: fsdp if x.ndim else replicated)
    step, restored, _ = Checkpointer(tmp_path, save_every=1).restore_latest(abstract)
    assert step == 2
    assert_bitwise_equal(restored, state)
    w = restored["params"]["w"]
    assert w.sharding == fsdp and set(w.sharding.device_set) == set(jax.devices()[4:])
    assert {s.data.shape for s in w.addressable_shards} == {(8, 2)}


def _damage(step_dir, damage):
    """Truncates or deletes the array data files (state/d/*) or deletes the JSON metadata item."""
    if damage == "delete_meta":
        (step_dir / "meta" / "metadata").unlink()
        return
    for path in (step_dir / "state" / "d").iterdir():
        if damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        else:
            path.unlink()


def _save_steps_1_and_2(directory, mesh):
    ckpt = Checkpointer(directory, save_every=1, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(mesh, step), {"step": step})
    ckpt.close()


@pytest.mark.parametrize("damage", ["truncate", "delete", "delete_meta"])
def test_unreadable_latest_falls_back_with_a_warning_and_keeps_the_files(tmp_path, caplog, damage):
    mesh = make_mesh({"data": -1})
    _save_steps_1_and_2(tmp_path, mesh)
    _damage(tmp_path / "2", damage)

    ckpt = Checkpointer(tmp_path, save_every=1)
    with caplog.at_level(logging.WARNING):
        step, restored, meta = ckpt.restore_latest(
            _abstract(_state(mesh), lambda x: x.sharding), move_aside_unreadable=True
        )
    assert step == 1 and meta == {"step": 1}
    assert_bitwise_equal(restored, _state(mesh, 1))
    assert any("step 2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("2.unreadable")]
    assert len(moved) == 1 and (moved[0] / "state").exists()  # moved aside, never deleted
    assert ckpt.save(2, _state(mesh, 2), {"step": 2})  # the run can save that step again
    ckpt.close()


def test_read_only_restore_of_a_damaged_latest_falls_back_and_leaves_it_in_place(tmp_path, caplog, monkeypatch):
    mesh = make_mesh({"data": -1})
    _save_steps_1_and_2(tmp_path, mesh)
    _damage(tmp_path / "2", "truncate")

    ckpt = Checkpointer(tmp_path, save_every=1)
    real_restore, reads = ckpt._manager.restore, []
    monkeypatch.setattr(ckpt._manager, "restore", lambda step, **kw: reads.append(step) or real_restore(step, **kw))
    with caplog.at_level(logging.WARNING):
        step, restored, meta = ckpt.restore_latest(_abstract(_state(mesh), lambda x: x.sharding))
    ckpt.close()
    assert step == 1 and meta == {"step": 1}
    assert_bitwise_equal(restored, _state(mesh, 1))
    assert reads == [2] * checkpoint.RESTORE_ATTEMPTS + [1]
    assert any("step 2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # e.g. a live run's step: nothing renamed


@pytest.mark.parametrize("kwargs", [{}, {"move_aside_unreadable": True}], ids=["read_only", "training"])
def test_a_transient_read_error_is_retried_and_renames_nothing(tmp_path, monkeypatch, kwargs):
    mesh = make_mesh({"data": -1})
    _save_steps_1_and_2(tmp_path, mesh)

    ckpt = Checkpointer(tmp_path, save_every=1)
    real_restore, failures = ckpt._manager.restore, [OSError("transient: connection reset by peer")]

    def flaky_restore(step, **kw):  # the first read of the newest step fails once, as a flaky gs:// read does
        if step == 2 and failures:
            raise failures.pop()
        return real_restore(step, **kw)

    monkeypatch.setattr(ckpt._manager, "restore", flaky_restore)
    step, restored, meta = ckpt.restore_latest(_abstract(_state(mesh), lambda x: x.sharding), **kwargs)
    ckpt.close()
    assert not failures and step == 2 and meta == {"step": 2}
    assert_bitwise_equal(restored, _state(mesh, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_all_steps_unreadable_raises_instead_of_starting_over(tmp_path):
    mesh = make_mesh({"data": -1})
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, _state(mesh, 1), {"step": 1})
    ckpt.close()
    wrong = {"something": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    with pytest.raises(RuntimeError, match="could be restored"):
        Checkpointer(tmp_path, save_every=1).restore_latest(wrong)
    assert (tmp_path / "1" / "state").exists()


_CHILD = textwrap.dedent("""
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp
    from relcirc_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], save_every=1, async_save=True)
    big = lambda value: {"w": jnp.full((64, 1024, 1024), value, jnp.float32)}  # 256 MiB
    ckpt.save(1, big(1.0), {"step": 1}); ckpt.wait()
    ckpt.save(2, big(2.0), {"step": 2})
    print("started", flush=True)
    time.sleep(120)
""")


def test_sigkill_during_async_save_leaves_the_previous_checkpoint_usable(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started"
        in_flight = [p.name for p in tmp_path.iterdir() if p.name.startswith("2.")]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert in_flight and not (tmp_path / "2").exists(), "step 2 finished before the kill; the test proves nothing"

    mesh = make_mesh({"data": -1})
    abstract = {"w": jax.ShapeDtypeStruct((64, 1024, 1024), jnp.float32, sharding=NamedSharding(mesh, P()))}
    ckpt = Checkpointer(tmp_path, save_every=1)
    step, restored, meta = ckpt.restore_latest(abstract)
    assert step == 1 and meta == {"step": 1}
    assert float(restored["w"].min()) == float(restored["w"].max()) == 1.0
    ckpt.close()
