"""Scale-out estimates per DiT size: parameters, train-state memory, activation memory and compute of one train step.

For each size the real train step (RTE text, paper recipe) is lowered and compiled for ONE device at a per-device
batch of 256 (nothing is run): FLOPs come from XLA's cost analysis of the compiled step, activation memory from its
memory analysis (temporary buffers; CPU backend, so TPU/GPU figures differ somewhat). The train state is params + EMA +
Adam m and v, all float32 (16 bytes per parameter); with fsdp=N it is split N ways, with pure data parallelism every
device holds all of it. The last line of output is one JSON object with the figures.

    python benchmarks/bench_scaleout.py [--sizes nano,micro,mini,b] [--batch 256] [--remat]
"""

import argparse
import json
import tempfile

import jax

from relcirc_jax.config import SIZES, base_config
from relcirc_jax.train import state as train_state
from relcirc_jax.train import step as train_step

STATE_BYTES_PER_PARAM = 16  # float32 params, EMA params, Adam first and second moments
SUSTAINED_FLOPS = 100e12  # a round reference rate: ~50% of a TPU v5e's bf16 peak, ~10-20% of an H100's


def step_figures(size: str, batch: int, remat: bool) -> dict:
    config = base_config("rte", size)
    config.train.batch_size = batch
    config.train.remat = remat
    with tempfile.TemporaryDirectory() as workdir:
        setup = train_state.build_run_setup(config, workdir, devices=jax.devices()[:1])
        setup.checkpointer.close()
    image = config.data.image_size
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((batch, image, image, 3), "float32"),
        "ids": jax.ShapeDtypeStruct((batch, 20), "int32"),
        "mask": jax.ShapeDtypeStruct((batch, 20), bool),
        "caption_index": jax.ShapeDtypeStruct((batch,), "int32"),
    }
    compiled = train_step.compile_train_step(setup, batch_shapes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = sum(leaf.size for leaf in jax.tree.leaves(setup.abstract_state.params))
    flops = float(cost["flops"])
    return {
        "size": size,
        "params_m": params / 1e6,
        "state_gb": params * STATE_BYTES_PER_PARAM / 1e9,
        "activations_gb": compiled.memory_analysis().temp_size_in_bytes / 1e9,
        "gflops_per_step": flops / 1e9,
        "ms_per_step_at_100tflops": 1e3 * flops / SUSTAINED_FLOPS,
        "images_per_s_per_device_at_100tflops": batch * SUSTAINED_FLOPS / flops,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="nano,micro,mini,b")
    parser.add_argument("--batch", type=int, default=256, help="per-device batch")
    parser.add_argument("--remat", action="store_true", help="rematerialise each block (less activation memory)")
    args = parser.parse_args()
    if not set(args.sizes.split(",")) <= set(SIZES) or args.batch < 1:
        parser.error(f"--sizes takes a comma-separated list of {SIZES} and --batch must be >= 1")
    rows = [step_figures(size, args.batch, args.remat) for size in args.sizes.split(",")]
    print(f"per device, batch {args.batch}{' with remat' if args.remat else ''}:")
    print(
        f"{'size':>5} {'params':>8} {'state':>9} {'activ.':>9} {'GFLOP/step':>11} {'ms@100TF':>9} {'img/s@100TF':>12}"
    )
    for r in rows:
        print(
            f"{r['size']:>5} {r['params_m']:7.1f}M {r['state_gb']:8.3f}G {r['activations_gb']:8.2f}G "
            f"{r['gflops_per_step']:11.0f} {r['ms_per_step_at_100tflops']:9.1f} "
            f"{r['images_per_s_per_device_at_100tflops']:12.0f}"
        )
    print(json.dumps({"batch_per_device": args.batch, "remat": args.remat, "rows": rows}))


if __name__ == "__main__":
    main()
