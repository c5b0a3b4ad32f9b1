"""RTE text encoder (random word vectors + sinusoidal positions) + DiT-micro (hidden 192, depth 6, 3 heads).

The recipe and its variants (:cpu, :quick, :smoke) are in relcirc_jax/config.py; measured results in README.

    python -m relcirc_jax.main --config=configs/rte_dit_micro.py[:VARIANT] --workdir=workdirs/rte_dit_micro

Reference model: pretrained/rte_dit_micro (its README.md has the command and the evaluation table).
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte", "micro", arg)
