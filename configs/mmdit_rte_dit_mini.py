"""RTE text encoder + an SD3-style MM-DiT parameter-matched to DiT-mini (hidden 384, depth 6, 6 heads): the MM-DiT keeps
depth and heads and narrows the head width so the parameter counts match (models/mmdit.py's table).

The recipe and its variants (:cpu, :quick, :smoke) are in relcirc_jax/config.py; the same as configs/rte_dit_mini.py
but for config.model.arch = "mmdit".

    python -m relcirc_jax.main --config=configs/mmdit_rte_dit_mini.py[:VARIANT] --workdir=workdirs/mmdit_rte_dit_mini
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte", "mini", arg, arch="mmdit")
