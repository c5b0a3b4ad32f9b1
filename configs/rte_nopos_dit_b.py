"""RTE text encoder without word positions + DiT-b (hidden 768, depth 12, 12 heads).

The recipe and its variants (:cpu, :quick, :smoke) are in relcirc_jax/config.py; measured results in README.

    python -m relcirc_jax.main --config=configs/rte_nopos_dit_b.py[:VARIANT] --workdir=workdirs/rte_nopos_dit_b
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte_nopos", "b", arg)
