"""RTE text encoder + an SD3-style MM-DiT parameter-matched to DiT-nano (hidden 192, depth 3, 3 heads): the MM-DiT keeps
depth and heads and narrows the head width so the parameter counts match (models/mmdit.py's table).

The recipe and its variants (:cpu, :quick, :smoke) are in relcirc_jax/config.py; the same as configs/rte_dit_nano.py
but for config.model.arch = "mmdit".

    python -m relcirc_jax.main --config=configs/mmdit_rte_dit_nano.py[:VARIANT] --workdir=workdirs/mmdit_rte_dit_nano
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte", "nano", arg, arch="mmdit")
