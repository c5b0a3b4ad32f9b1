"""T5 v1.1 text encoder (a local checkpoint: text.t5_path) + DiT-mini (hidden 384, depth 6, 6 heads).

The recipe and its variants (:cpu, :quick, :smoke) are in relcirc_jax/config.py; measured results in README.

    python -m relcirc_jax.main --config=configs/t5_dit_mini.py[:VARIANT] --workdir=workdirs/t5_dit_mini
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("t5", "mini", arg)
