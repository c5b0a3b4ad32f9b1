"""rte_nopos text encoder + DiT-b. All logic is in relcirc_jax/config.py.

Launch: python -m relcirc_jax.main --config=configs/rte_nopos_dit_b.py --workdir=workdirs/rte_nopos_dit_b
Full run (no suffix): colour/shape/unique-binding/relation about 99/96/41/15 % (paper: without word positions the
  relation is not learned); 160k steps at batch 256 take ~228 min of train steps on one H100 (2,996 img/s measured by
  benchmarks/bench_train.py; add sampling and evaluations).
CPU run (":cpu" suffix): about an hour on a 2-core CPU, but only ~300 steps of DiT-B: a pipeline check, not a result.
Smoke test (":smoke"): seconds; checks the set-up, learns nothing.
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte_nopos", "b", arg)
