"""Test set-up: 8 fake CPU devices so sharding code runs for real; must run before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402 - after the XLA flags above

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
