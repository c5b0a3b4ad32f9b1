"""RTE text encoder without word positions + DiT-nano (hidden 192, depth 3, 3 heads).

The recipe and its variants (:cpu, :quick, :smoke) are in relcirc_jax/config.py; measured results in README.

    python -m relcirc_jax.main --config=configs/rte_nopos_dit_nano.py[:VARIANT] --workdir=workdirs/rte_nopos_dit_nano
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte_nopos", "nano", arg)
