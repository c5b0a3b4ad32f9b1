"""relcirc_jax.parallel: device mesh from config, logical axis rules, per-host batch assembly.

Version notes (jax 0.10.2): `jax.make_mesh` defaults to `AxisType.Explicit`, so `make_mesh` passes `AxisType.Auto`
(what Linen and jit-with-shardings expect); the mesh context is `jax.set_mesh` (`jax.sharding.use_mesh` is gone).
"""

from relcirc_jax.parallel.axes import MESH_AXES
from relcirc_jax.parallel.host_data import shared_to_global, to_global, to_host
from relcirc_jax.parallel.mesh import make_mesh
from relcirc_jax.parallel.rules import (
    DEFAULT_RULES,
    batch_sharding,
    logical_to_mesh_sharding,
    logical_to_mesh_spec,
    param_shardings,
    replicated,
)

__all__ = [
    "MESH_AXES",
    "DEFAULT_RULES",
    "batch_sharding",
    "logical_to_mesh_sharding",
    "logical_to_mesh_spec",
    "make_mesh",
    "param_shardings",
    "replicated",
    "shared_to_global",
    "to_global",
    "to_host",
]
