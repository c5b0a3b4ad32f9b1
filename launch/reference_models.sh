#!/usr/bin/env bash
# Train reference models for pretrained/ on one accelerator, then export them: every config in --configs trains at the
# same time (one process each, sharing the device) with its :cpu recipe at batch 256 until --minutes of wall clock
# are spent, evaluates its last step, and `python3 -m relcirc_jax.pretrained` writes OUT/NAME (the EMA weights as
# bfloat16 safetensors, and config.json). pretrained/rte_dit_micro and rte_nopos_dit_micro were made this way on one
# H200 (6.5 minutes each, side by side); each export's README table then comes from evaluating it on the CPU
# (README "Reference models").
#
# Usage, from anywhere (the runs start in the repository root):
#   launch/reference_models.sh --configs=mmdit_rte_dit_micro [--minutes=6.5] [--batch=256]
#       [--root=workdirs/reference] [--out=ROOT/export] [--dry-run] [-- MAIN_FLAGS...]
#
#   --configs   comma-separated names of files configs/NAME.py, each trained with its :cpu variant
#   --minutes   each run's train.time_budget_minutes (start-up compilation included); a rerun resumes the runs and
#               trains each that long again
#   --batch     train.batch_size, taken whole (train.microbatches=1: microbatches only pay on a CPU)
#   --root      one workdir per model, ROOT/NAME, and its training log ROOT/NAME.log
#   --out       the exports, OUT/NAME, each new or empty (an export never overwrites a model)
#   after --    flags for every training run, e.g. -- --config.train.lr=1e-3

set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

opt_configs="" opt_minutes=6.5 opt_batch=256 opt_root=workdirs/reference opt_out=""
parse_args "$@"
require configs
[[ $opt_minutes =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--minutes=$opt_minutes is not a number of minutes, e.g. 6.5."
[[ $opt_batch =~ ^[1-9][0-9]*$ ]] || die "--batch=$opt_batch is not a positive whole number of images, e.g. 256."
IFS=, read -ra names <<<"$opt_configs"
for name in "${names[@]}"; do
  [[ -f $REPO/configs/$name.py ]] || die "no configs/$name.py; --configs takes names of files in configs/, e.g." \
    "rte_dit_micro,mmdit_rte_dit_micro."
done
root=$(absolute "${opt_root%/}")
export_dir=$(absolute "${opt_out:-$root/export}")
cd "$REPO"

# Evaluation and samples only at the end: the time budget saves, samples and evaluates the last step.
recipe=(
  "--config.train.batch_size=$opt_batch" --config.train.microbatches=1 --config.train.num_steps=1000000
  "--config.train.time_budget_minutes=$opt_minutes" --config.eval.every_steps=1000000
  --config.sample.every_steps=1000000 --config.checkpoint.every_steps=5000 --config.log.every_steps=500
  --config.eval.images_per_prompt=20 --config.eval.batch_size=960
)
pids=()
((DRY_RUN)) || mkdir -p "$root"
for name in "${names[@]}"; do
  train=(python3 -m relcirc_jax.main "--config=configs/$name.py:cpu" "--workdir=$root/$name" --mode=train
    "${recipe[@]}" "${EXTRA_ARGS[@]}")
  echo "+ $(quote "${train[@]}") > $(quote "$root/$name.log") 2>&1 &"
  if ! ((DRY_RUN)); then
    "${train[@]}" >"$root/$name.log" 2>&1 &
    pids+=($!)
  fi
done
failed=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("$root/${names[$i]}.log")
done
((${#failed[@]} == 0)) || die "training failed, see ${failed[*]}; a rerun resumes each run from its last checkpoint."
for name in "${names[@]}"; do
  run python3 -m relcirc_jax.pretrained "--workdir=$root/$name" "--out=$export_dir/$name"
done
