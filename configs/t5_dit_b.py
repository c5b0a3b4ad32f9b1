"""t5 text encoder + DiT-b. All logic is in relcirc_jax/config.py.

Launch: python -m relcirc_jax.main --config=configs/t5_dit_b.py --workdir=workdirs/t5_dit_b
Full run (no suffix): colour/shape/unique-binding/relation about 99/97/93/89 % (paper, DiT-B T5); 160k steps at batch
  256 take ~228 min of train steps on one H100 (2,996 img/s measured by benchmarks/bench_train.py; add sampling and
  evaluations).
CPU run (":cpu" suffix): about an hour on a 2-core CPU, but only ~300 steps of DiT-B: a pipeline check, not a result.
Smoke test (":smoke"): seconds; checks the set-up, learns nothing.
T5 needs a local T5-v1.1-XXL directory: add --config.text.t5_path=/path/to/t5-v1_1-xxl (nothing is downloaded).
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("t5", "b", arg)
