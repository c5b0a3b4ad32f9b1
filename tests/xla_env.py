"""The environment of the processes the tests start (CLI runs, benchmarks, notebook kernels): conftest's XLA flags (no
LLVM optimisation, so they compile faster) and compilation cache, with their own number of fake CPU devices in place
of conftest's 8."""

import os


def subprocess_env(devices: int | None = None) -> dict:
    """os.environ on CPU with `devices` fake XLA devices (None: the host's one)."""
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in flag]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
