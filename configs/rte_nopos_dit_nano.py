"""rte_nopos text encoder + DiT-nano. All logic is in relcirc_jax/config.py.

Launch: python -m relcirc_jax.main --config=configs/rte_nopos_dit_nano.py --workdir=workdirs/rte_nopos_dit_nano
Full run (no suffix): between the nano and DiT-B figures of the paper (smaller models learn relations less); 160k steps
  at batch 256 take ~16 min of train steps on one H100 (39,182 img/s measured by benchmarks/bench_train.py; add sampling
  and evaluations).
CPU run (":cpu" suffix): about an hour on a 2-core CPU (3,600 steps at 0.85 s; twice that on slower
  machines); measured results in README "Current results".
Smoke test (":smoke"): seconds; checks the set-up, learns nothing.
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("rte_nopos", "nano", arg)
