"""t5 text encoder + DiT-micro. All logic is in relcirc_jax/config.py.

Launch: python -m relcirc_jax.main --config=configs/t5_dit_micro.py --workdir=workdirs/t5_dit_micro
Full run (no suffix): between the nano and DiT-B figures of the paper (smaller models learn relations less); 160k steps
  at batch 256 take ~32 min of train steps on one H100 (21,857 img/s measured by benchmarks/bench_train.py; add sampling
  and evaluations).
CPU run (":cpu" suffix): about an hour on a 2-core CPU (3,600 steps at 0.85 s; twice that on slower
  machines); measured results in README "Current results".
Smoke test (":smoke"): seconds; checks the set-up, learns nothing.
T5 needs a local T5-v1.1-XXL directory: add --config.text.t5_path=/path/to/t5-v1_1-xxl (nothing is downloaded).
"""

from relcirc_jax.config import base_config


def get_config(arg=None):
    return base_config("t5", "micro", arg)
