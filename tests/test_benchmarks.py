"""The benchmark scripts' step builders run against the current train-step API (nothing else calls them, so a change
of signature would otherwise only surface when someone next runs a benchmark).

Tiny figures only: DiT-nano, batch 8 (one row per fake device); no timing is checked.
"""

import importlib.util
import json
import os
import subprocess
import sys

from xla_env import subprocess_env

from relcirc_jax.models import cpu_bf16_matmul
from tests.conftest import REPO


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_steps_run_and_count_their_flops(tmp_path):
    bench_train = _benchmark("bench_train")
    figures = bench_train.jax_train("nano", 8, str(tmp_path))
    figures["step"]()
    assert figures["compile_s"] > 0
    # XLA counts the matmuls and more: here also 8 devices' copies of the replicated AdamW and EMA updates
    assert 1.0 <= figures["xla_flops_per_step"] / figures["flops_per_step"] <= 1.5
    bench_train.torch_train(figures["model_cfg"], 2)()  # the same DiT in diffusers


def test_bench_scaleout_figures_a_compiled_step():
    figures = _benchmark("bench_scaleout").step_figures("nano", 8, remat=False)
    assert figures["gflops_per_step"] > 0 and figures["activations_gb"] > 0 and figures["params_m"] > 0


def test_bench_train_runs_on_the_cpu_devices_it_is_asked_for(tmp_path):
    # The whole script, smallest figures: its JSON line names the XLA devices the step really ran on.
    env = subprocess_env()  # not conftest's 8 fake devices
    command = [sys.executable, os.path.join(REPO, "benchmarks", "bench_train.py"), "--sizes=nano", "--batches=8"]
    command += ["--dtypes=float32", "--steps=1", "--cpu_devices=2", "--microbatch=4", f"--workdir={tmp_path}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["devices"] == 2 and set(figures["matmul_peak_gflops"]) == {"jax_float32", "torch_float32"}
    # which bf16 Dense products the JAX rows ran: a gemm library's, or None for XLA's dot
    assert figures["jax_bf16_gemm_library"] in (None, *cpu_bf16_matmul.LIBRARY_GEMMS.values())
    assert [row["batch"] for row in figures["rows"]] == [8]
    assert set(figures["rows"][0]["images_per_s"]) == {"jax_float32", "jax_float32_mb4", "torch_float32"}


def test_bench_analysis_runs_whole_at_the_smallest_sizes(tmp_path):
    # Every analysis benchmark on DiT-nano, one image, one repeat: its JSON line has a row per ablation chunk size.
    env = subprocess_env()
    command = [sys.executable, os.path.join(REPO, "benchmarks", "bench_analysis.py"), "--synopsis_batch=1"]
    command += ["--ablation_batch=1", "--ablation_chunks=0,5", "--repeats=1"]
    command += ["--synopsis_size=nano", "--ablation_size=nano", "--qk_size=nano"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=True, cwd=tmp_path)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    masks = figures["ablation_masks"]
    assert set(figures["ablation_screen_s_by_chunk"]) == {str(masks), "5"}
    assert figures["ablation_tflop"] > 0 and figures["qk_screen_heads"] > 0 and figures["synopsis_ratio"] > 0
