"""Test set-up: 8 fake CPU devices so sharding code runs for real; must run before jax is imported."""

import os

# No LLVM optimisation of XLA:CPU's generated code (the HLO, its fusions and the library matmuls are unchanged): most
# of the suite's time is compiling small programs, which this cuts by about a third (whole suite 1,065 -> 905 s on 2
# cores); the numerics tests hold at the same tolerances. Subprocesses and notebook kernels inherit it.
XLA_TEST_FLAGS = " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + XLA_TEST_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402 - after the XLA flags above

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests compile the same few programs (the :smoke train step, its samplers) again and again, across files too; a
# persistent compilation cache shared by the whole session, both xdist workers and their subprocesses turns each repeat
# from ~10 s into ~1 s on a busy 2-core machine. A hit returns the very executable that was compiled, so results are
# unchanged; a half-written entry read by the other worker fails to decompress, and JAX then compiles instead.
CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory, worker_id):
    """Enables a persistent compilation cache for the session, in this process and (through the environment) in every
    subprocess the tests start; restores the settings at the end."""
    import jax
    from jax._src import compilation_cache

    base = tmp_path_factory.getbasetemp()
    directory = base.parent / "jax_cache" if worker_id != "master" else base / "jax_cache"  # xdist: the run's root
    directory.mkdir(exist_ok=True)
    options = {**CACHE_OPTIONS, "jax_compilation_cache_dir": str(directory)}
    previous = {name: getattr(jax.config, name) for name in options}
    with pytest.MonkeyPatch.context() as environment:
        for name, value in options.items():
            jax.config.update(name, value)
            environment.setenv(name.upper(), str(value))
        yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A `configs/rte_dit_nano.py:smoke` run trained once through the CLI: 4 steps, checkpoints at steps 2 and 4, its
    own evaluation at step 4. Tests read it; those that write put their files beside its checkpoints."""
    from relcirc_jax import main as cli

    workdir = tmp_path_factory.mktemp("smoke_run")
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["main", f"--config={REPO}/configs/rte_dit_nano.py:smoke", f"--workdir={workdir}", "--mode=train"])
    cli.main(["main"])
    return workdir
