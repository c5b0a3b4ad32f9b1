"""rte text encoder + DiT-nano. All logic is in relcirc_jax/config.py.

Launch: python -m relcirc_jax.main --config=configs/rte_dit_nano.py --workdir=workdirs/rte_dit_nano
Full run (no suffix): colour and shape well learned, relation only about 5 % (paper: nano RTE fails at relations); 40k
  steps at batch 256 take ~4 min of train steps on one H100 (39,182 img/s measured by benchmarks/bench_train.py; add
  sampling and evaluations).
CPU run (":cpu" suffix): about an hour on a 2-core CPU; measured for rte micro (3,600 steps, 51 min): colour 100 %,
  shape 59 %, unique binding 28 %, relation 12 % (README "Current results").
Smoke test (":smoke"): seconds; checks the set-up, learns nothing.
"""
from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte", "nano", arg)
