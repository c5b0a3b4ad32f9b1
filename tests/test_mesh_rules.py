"""Mesh specs, logical-axis rules -> real parameter shardings, and per-host batch assembly on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from relcirc_jax.parallel import (
    DEFAULT_RULES,
    batch_sharding,
    logical_to_mesh_sharding,
    make_mesh,
    param_shardings,
    replicated,
    to_global,
)


def test_make_mesh_fills_the_remaining_devices():
    mesh = make_mesh({"data": -1, "fsdp": 2, "model": 1})
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_make_mesh_exact_spec_and_missing_axes_default_to_one():
    assert dict(make_mesh({"data": 2, "fsdp": 2, "model": 2}).shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert dict(make_mesh({"model": 8}).shape) == {"data": 1, "fsdp": 1, "model": 8}


def test_make_mesh_on_a_subset_of_devices():
    mesh = make_mesh({"data": -1, "fsdp": 2}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 1}
    assert set(mesh.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"data": 3, "fsdp": 1, "model": 1}, "not to the device count"),
        ({"data": -1, "fsdp": 3}, "does not divide the device count"),
        ({"data": -1, "fsdp": -1}, "more than one axis is -1"),
        ({"data": -1, "tensor": 2}, "unknown axis name"),
        ({"data": 0, "fsdp": -1}, "positive integers"),
    ],
)
def test_impossible_mesh_spec_names_spec_device_count_and_fix(spec, problem):
    with pytest.raises(ValueError) as err:
        make_mesh(spec)
    message = str(err.value)
    assert problem in message and str(spec) in message and "8 devices" in message and "Fix:" in message


class ToyBlock(nn.Module):
    """Parameters annotated with the same logical names as the DiT."""

    @nn.compact
    def __call__(self, x):
        dense = lambda feats, names, name: nn.Dense(
            feats, name=name, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
        )
        h = dense(32, ("embed", "mlp"), "fc1")(x)
        h = dense(16, ("mlp", "embed"), "fc2")(h)
        h = dense(6, ("embed", "heads"), "odd_heads")(h)  # 6 heads: the model axis (2) divides, fsdp (2) divides 16
        table = self.param("table", nn.with_logical_partitioning(nn.initializers.zeros, ("table", "embed")), (5, 3))
        return h, table


def _abstract_toy():
    boxed = jax.eval_shape(ToyBlock().init, jax.random.key(0), jnp.zeros((4, 16)))
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def test_param_shardings_follow_the_rules_on_a_2x2x2_mesh():
    mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
    abstract, specs = _abstract_toy()
    shardings = param_shardings(abstract, specs, mesh)["params"]
    assert shardings["fc1"]["kernel"].spec == P("fsdp", "model")
    assert shardings["fc2"]["kernel"].spec == P("model", "fsdp")
    assert shardings["odd_heads"]["kernel"].spec == P("fsdp", "model")
    assert shardings["fc1"]["bias"].spec == P()  # unannotated -> replicated


def test_param_shardings_replicate_a_dim_the_mesh_axis_does_not_divide_and_say_so(caplog):
    mesh = make_mesh({"data": 1, "fsdp": 2, "model": 4})
    abstract, specs = _abstract_toy()
    with caplog.at_level("WARNING"):
        shardings = param_shardings(abstract, specs, mesh)["params"]
    assert shardings["odd_heads"]["kernel"].spec == P("fsdp", None)  # 6 heads over model=4 -> replicated
    assert shardings["table"].spec == P(None, None)  # embed dim 3 over fsdp=2 -> replicated
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("2 parameter dims are replicated"), warning
    assert "['odd_heads']['kernel'] dim 6 over model (4)" in warning
    caplog.clear()
    with caplog.at_level("WARNING"):
        param_shardings(abstract, specs, make_mesh({"data": 4, "fsdp": 1, "model": 2}))
    assert not caplog.records  # every annotated dim divides: nothing to say


def test_optimizer_state_inherits_the_param_shardings():
    mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})

    def init_state(key):
        params = ToyBlock().init(key, jnp.zeros((4, 16)))
        return {"params": params, "opt": optax.adamw(1e-3).init(params), "step": jnp.int32(0)}

    boxed = jax.eval_shape(init_state, jax.random.key(0))
    shardings = param_shardings(nn.unbox(boxed), nn.get_partition_spec(boxed), mesh)
    adam = shardings["opt"][0]
    assert adam.mu["params"]["fc1"]["kernel"].spec == P("fsdp", "model")
    assert adam.nu["params"]["fc2"]["kernel"].spec == P("model", "fsdp")
    assert adam.count.spec == P() and shardings["step"].spec == P()


def test_jit_places_initialised_params_on_the_rule_shardings():
    mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
    abstract, specs = _abstract_toy()
    shardings = param_shardings(abstract, specs, mesh)
    init = jax.jit(lambda key: nn.unbox(ToyBlock().init(key, jnp.zeros((4, 16)))), out_shardings=shardings)
    kernel = init(jax.random.key(0))["params"]["fc1"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "model")
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 16)}


def test_logical_to_mesh_sharding_and_unknown_name():
    mesh = make_mesh({"data": -1})
    tree = logical_to_mesh_sharding({"a": P("embed", "caption"), "b": P("adaln")}, mesh)
    assert tree["a"].spec == P("fsdp", None) and tree["b"].spec == P("model")
    rows = logical_to_mesh_sharding(P("rows", None), mesh, (("rows", ("data", "fsdp")),))  # rules are data
    assert rows.spec == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'vocab' has no sharding rule"):
        logical_to_mesh_sharding(P("vocab"), mesh, DEFAULT_RULES)


def test_batch_and_replicated_shardings():
    mesh = make_mesh({"data": 4, "fsdp": 2})
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert replicated(mesh).is_fully_replicated


def test_to_global_shards_the_leading_dim_over_data_and_fsdp():
    mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
    images = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2)
    batch = to_global({"images": images, "labels": np.arange(8)}, mesh)
    assert batch["images"].shape == (8, 3, 2) and batch["images"].sharding == batch_sharding(mesh)
    assert {s.data.shape for s in batch["images"].addressable_shards} == {(2, 3, 2)}  # 4 batch shards, model copies
    np.testing.assert_array_equal(np.asarray(batch["images"]), images)
    np.testing.assert_array_equal(np.asarray(batch["labels"]), np.arange(8))


def test_to_global_rejects_a_batch_that_does_not_split():
    mesh = make_mesh({"data": -1})
    with pytest.raises(ValueError, match="multiple of 8"):
        to_global({"images": np.zeros((6, 2))}, mesh)


@pytest.mark.parametrize(
    "starts, calls",
    [
        ([0, 16, 32, 48], [(0, 1)]),  # one process holds the whole batch: one call
        ([32, 48], [(1, 2)]),  # process-major: the process's own half
        ([16, 48], [(1, 4), (3, 4)]),  # a mesh that interleaves the processes' devices
        ([16, 32], [(1, 4), (2, 4)]),  # adjacent, but [16, 48) is no aligned slice of 64
        ([0, 16, 48], [(0, 2), (3, 4)]),
    ],
)
def test_slice_calls_cover_a_processs_row_blocks(starts, calls):
    from relcirc_jax.parallel.host_data import slice_calls

    assert slice_calls(starts, 16, 64) == calls


def test_local_rows_are_the_rows_the_devices_hold_whatever_the_device_order():
    """A process's training rows are those its devices hold in the batch sharding, made by slice calls; here one
    process holds every device, so a mesh in reversed device order still gets the whole batch in row order, and the
    slices of a process holding blocks 1 and 3 equal those rows of the whole batch (dataset.train_batch is a pure
    function of the row)."""
    from relcirc_jax.data import dataset
    from relcirc_jax.parallel.host_data import local_rows, slice_calls

    calls = []

    def make_slice(k, n):
        calls.append((k, n))
        return dataset.train_batch(3, 5, global_batch=64, process_index=k, process_count=n)

    whole = dataset.train_batch(3, 5, global_batch=64)
    mesh = make_mesh({"data": -1}, devices=jax.devices()[::-1])
    got = local_rows(mesh, 64, make_slice)
    assert calls == [(0, 1)] and sorted(got) == sorted(whole)
    np.testing.assert_array_equal(got["image"], whole["image"])
    parts = [make_slice(k, n) for k, n in slice_calls([16, 48], 16, 64)]
    for key in ("image", "ids", "centers"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key][np.r_[16:32, 48:64]])
    with pytest.raises(ValueError, match="multiple of 8"):
        local_rows(mesh, 60, make_slice)


def test_rules_are_config_data():
    """config.parallel.logical_axis_rules (as a config.json stores it: lists) decide the parameter shardings."""
    import json

    from relcirc_jax.config import base_config
    from relcirc_jax.models import dit
    from relcirc_jax.parallel.rules import rule_problems, rules_from_config
    from relcirc_jax.train import state as train_state

    config = base_config("rte", "nano", "smoke")
    stored = json.loads(json.dumps(config.parallel.logical_axis_rules))
    assert rules_from_config(stored) == DEFAULT_RULES and not rule_problems(DEFAULT_RULES)
    model_cfg = train_state.model_config(config, caption_channels=config.text.dim)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    tx = train_state.optimizer(config)
    _, default = train_state.state_shardings(model_cfg, tx, mesh)
    no_fsdp = rules_from_config([[name, None if mesh_axes == "fsdp" else mesh_axes] for name, mesh_axes in stored])
    _, replicated_embed = train_state.state_shardings(model_cfg, tx, mesh, rules=no_fsdp)
    kernel = lambda sh: sh.params["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].spec  # noqa: E731
    assert kernel(default) == P("fsdp", "model") and kernel(replicated_embed) == P(None, "model")
    assert dit.logical_specs(model_cfg)["transformer_blocks_0"]["attn1"]["to_q"]["kernel"] == P("embed", "heads")
    assert rule_problems(no_fsdp[1:] + (("heads", "modle"),)) == [
        "no rule for the logical axes ['embed'] (every one of ('embed', 'heads', 'mlp', 'caption', 'adaln', 'table', "
        "'patch') needs one)",
        "more than one rule for ['heads']",
        "unknown mesh axes ['modle'] (the mesh has ('data', 'fsdp', 'model'))",
    ]
