"""Logical axis rules: how the model's logical parameter axis names map onto the mesh axes (names: parallel/axes.py).

The DiT annotates its parameters with `flax.linen.with_logical_partitioning`; this module turns those logical
`PartitionSpec`s into `NamedSharding`s on a concrete mesh, with DEFAULT_RULES or the rules of
config.parallel.logical_axis_rules. The batch is split over axes.BATCH_AXES.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from relcirc_jax.parallel import axes

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    (axes.EMBED, axes.FSDP),
    (axes.HEADS, axes.MODEL),
    (axes.MLP, axes.MODEL),
    (axes.CAPTION, None),
    (axes.ADALN, axes.MODEL),
    (axes.TABLE, None),
    (axes.PATCH, None),
)

BATCH_AXES = axes.BATCH_AXES


def rules_from_config(value: Sequence) -> tuple[tuple[str, MeshAxes], ...]:
    """config.parallel.logical_axis_rules (pairs of (logical name, mesh axis / tuple of them / None), or the lists a
    config.json makes of them) as Rules."""
    return tuple((str(name), tuple(mesh) if isinstance(mesh, (list, tuple)) else mesh) for name, mesh in value)


def rule_problems(rules: Rules) -> list[str]:
    """What is wrong with a rule set: logical names it leaves out or repeats, mesh axes that do not exist."""
    names = [name for name, _ in rules]
    problems = []
    if missing := [name for name in axes.LOGICAL_AXES if name not in names]:
        problems.append(f"no rule for the logical axes {missing} (every one of {axes.LOGICAL_AXES} needs one)")
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        problems.append(f"more than one rule for {repeated}")
    used = [a for _, mesh in rules for a in ((mesh,) if isinstance(mesh, str) else (mesh or ()))]
    if unknown := sorted(set(used) - set(axes.MESH_AXES)):
        problems.append(f"unknown mesh axes {unknown} (the mesh has {axes.MESH_AXES})")
    return problems


log = logging.getLogger(__name__)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _mesh_axes_for(logical_name: str | None, rules: Rules) -> MeshAxes:
    if logical_name is None:
        return None
    for name, mesh_axes in rules:
        if name == logical_name:
            return mesh_axes
    known = [name for name, _ in rules]
    raise ValueError(
        f"Logical axis name {logical_name!r} has no sharding rule (rules cover {known}). "
        f"Fix: add ({logical_name!r}, <mesh axis or None>) to the rules."
    )


def logical_to_mesh_spec(logical_spec: P, rules: Rules = DEFAULT_RULES) -> P:
    """Maps one PartitionSpec of logical names to a PartitionSpec of mesh axes (no shape checks)."""
    return P(*(_mesh_axes_for(name, rules) for name in logical_spec))


def logical_to_mesh_sharding(logical_specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh` (no shape checks)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh_spec(spec, rules)), logical_specs, is_leaf=_is_spec
    )


def _axes_size(mesh: Mesh, mesh_axes: MeshAxes) -> int:
    if mesh_axes is None:
        return 1
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return math.prod(mesh.shape[name] for name in names)


def _fitting_spec(shape: tuple[int, ...], mesh_spec: P, mesh: Mesh, path: str, replicated: list[str]) -> P:
    """`mesh_spec` with each dim's mesh axes dropped where they do not divide it (noted in `replicated`)."""
    if len(mesh_spec) > len(shape):
        raise ValueError(
            f"Parameter {path} has shape {shape} but its logical spec {mesh_spec} names "
            f"{len(mesh_spec)} axes. Fix: give the annotation one name per dimension."
        )
    fitted = []
    for dim, mesh_axes in zip(shape, mesh_spec):
        size = _axes_size(mesh, mesh_axes)
        if dim % size:
            replicated.append(f"{path} dim {dim} over {mesh_axes} ({size})")
            mesh_axes = None
        fitted.append(mesh_axes)
    return P(*fitted)


def param_shardings(abstract_params: Any, logical_specs: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a (ShapeDtypeStruct) pytree, replicating any dim its mesh axes do not divide.

    `logical_specs` has the same structure as `abstract_params` with a PartitionSpec of logical names per leaf.
    Works for a whole train state: optax states built inside `jax.eval_shape` keep Flax's logical boxes, so
    `boxed = jax.eval_shape(init_state, ...)`; `param_shardings(nn.unbox(boxed), nn.get_partition_spec(boxed), mesh)`.
    """

    replicated: list[str] = []

    def sharding(path, spec: P, leaf) -> NamedSharding:
        mesh_spec = logical_to_mesh_spec(spec, rules)
        path = jax.tree_util.keystr(path)
        return NamedSharding(mesh, _fitting_spec(tuple(leaf.shape), mesh_spec, mesh, path, replicated))

    shardings = jax.tree_util.tree_map_with_path(sharding, logical_specs, abstract_params, is_leaf=_is_spec)
    if replicated:  # a silent fallback would hide memory that is not split over the mesh
        log.warning(
            "%d parameter dims are replicated, not sharded, because their mesh axes do not divide them (e.g. %s). "
            "Their memory is not split over those axes; to split it, pick mesh sizes (parallel.mesh) that divide "
            "the model's sizes.",
            len(replicated), "; ".join(replicated[:3]),
        )  # fmt: skip
    return shardings


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the mesh's batch axes (data x fsdp)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data and fsdp axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, P())
