"""minilm text encoder + DiT-b. All logic is in relcirc_jax/config.py.

Launch: python -m relcirc_jax.main --config=configs/minilm_dit_b.py --workdir=workdirs/minilm_dit_b
Full run (no suffix): not in the paper; expect colour and shape near the RTE model, relation between RTE-nopos and T5;
  160k steps at batch 256 take ~228 min of train steps on one H100 (2,996 img/s measured by
  benchmarks/bench_train.py; add sampling and evaluations).
CPU run (":cpu" suffix): about an hour on a 2-core CPU, but only ~300 steps of DiT-B: a pipeline check, not a result.
Smoke test (":smoke"): seconds; checks the set-up, learns nothing.
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("minilm", "b", arg)
