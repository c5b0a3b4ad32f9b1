"""RTE text encoder (random word vectors + sinusoidal positions) + DiT-mini (hidden 384, depth 6, 6 heads).

The recipe and its variants (:cpu, :quick, :smoke) are in relcirc_jax/config.py; measured results in README.

    python -m relcirc_jax.main --config=configs/rte_dit_mini.py[:VARIANT] --workdir=workdirs/rte_dit_mini
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte", "mini", arg)
