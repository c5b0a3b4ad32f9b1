"""Device mesh from a config spec such as {"data": -1, "fsdp": 1, "model": 1}.

The mesh always has the axes ("data", "fsdp", "model") in that order, with `AxisType.Auto` so Linen code and
`jax.jit(..., in_shardings=..., out_shardings=...)` decide the partitioning from explicit `NamedSharding`s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from relcirc_jax.parallel.axes import MESH_AXES

FILL = -1


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ("data", "fsdp", "model") mesh; a size of -1 takes all devices the other axes leave over.

    Axes missing from `spec` have size 1. The product of the sizes must equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_shape(spec: Mapping[str, int], device_count: int, name: str = "Mesh spec") -> tuple[int, ...]:
    """The sizes of the MESH_AXES that `spec` gives on `device_count` devices (missing axes 1, a -1 axis the devices
    the others leave over). Arithmetic only, no JAX call, so config validation checks a spec against any device count.
    A spec that does not fit raises a ValueError naming `name`, the spec, the device count, the problem and the fix."""
    spec = dict(spec.items())

    def fail(problem: str, fix: str) -> ValueError:
        return ValueError(f"{name} {spec} does not fit {device_count} devices: {problem}. Fix: {fix}.")

    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise fail(f"unknown axis name(s) {unknown}", f"use only the axes {list(MESH_AXES)}")
    sizes = [spec.get(name, 1) for name in MESH_AXES]
    if any(not isinstance(s, int) or (s < 1 and s != FILL) for s in sizes):
        raise fail("axis sizes must be positive integers or -1", "give each axis a size >= 1, or -1 for 'the rest'")
    fills = sizes.count(FILL)
    if fills > 1:
        raise fail("more than one axis is -1", "set at most one axis to -1")
    fixed = math.prod(s for s in sizes if s != FILL)
    if fills == 1:
        if device_count % fixed:
            raise fail(
                f"the fixed axes multiply to {fixed}, which does not divide the device count",
                f"make the fixed axis sizes multiply to a divisor of {device_count}",
            )
        sizes[sizes.index(FILL)] = device_count // fixed
    elif fixed != device_count:
        raise fail(
            f"the axis sizes multiply to {fixed}, not to the device count",
            f"make them multiply to {device_count}, or set one axis (usually data) to -1",
        )
    return tuple(sizes)
