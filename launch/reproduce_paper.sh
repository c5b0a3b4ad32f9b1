#!/usr/bin/env bash
# Reproduce the paper (Wang et al. 2026, arXiv 2601.06338) in one command: for each text encoder x DiT size of its grid,
# train configs/{encoder}_dit_{size}.py, evaluate it (--mode=evaluate), run every circuit analysis
# (--mode=analyze --config.analysis.kind=all), then write ROOT/report.md (launch/paper_report.py): each run's accuracy
# beside the paper's main table, with links to its eval files and analysis/<kind>/summary.md and figures.
#
# Recipe: each config file's default, i.e. no :variant suffix, IS the paper's recipe (relcirc_jax/config.py; there is no
# :paper variant): a fixed set of 10,000 scenes, 160,000 steps at batch 256, AdamW lr 1e-4, eps-prediction, EMA 0.9999.
# Evaluation: the config's eval defaults ARE the paper's protocol: the 96 paper_main prompts x 100 images, DPM-Solver++
# 14 steps, CFG 4.5 against the empty-prompt embedding, EMA weights, scored by this project's and the paper's detector.
# README "Scaling out" gives the cost: about 22 H100-hours of training for the 16 runs, plus ~10 % for evaluations.
#
# Usage, from anywhere (the jobs run in the repository root), in an environment with `pip install -e '.[minilm]'`:
#   launch/reproduce_paper.sh --t5_path=/models/t5-v1_1-xxl [--root=workdirs/paper] [--launcher=local|slurm]
#       [--encoders=rte,rte_nopos,t5,minilm] [--sizes=nano,micro,mini,b] [--gpus_per_job=1] [--dry-run]
#       [-- MAIN_FLAGS...]
#
#   --root         one workdir per run, ROOT/{encoder}_dit_{size}, and ROOT/report.md (relative = to the current dir)
#   --launcher     local (default): every command here, one after another, stopping at the first failure; rerun to
#                  resume (training continues from its last checkpoint; evaluate and analyze start over).
#                  slurm: three chained one-node jobs per run through launch/slurm_gpu.sbatch --mode=... (each starts
#                  when the previous one succeeded; set SBATCH_PARTITION, SBATCH_ACCOUNT etc. in the environment),
#                  then one CPU job that writes the report once they all ended. A dry run shows placeholder job ids.
#   --encoders --sizes  comma-separated subsets of the grid, run in this order (the smallest models first by default)
#   --t5_path      a local Hugging Face google/t5-v1_1-xxl directory, needed when t5 is in --encoders
#   --gpus_per_job GPUs of each SLURM job (--launcher=slurm); a batch-256 run gains little from more
#   after --       flags for every relcirc_jax.main call, e.g. -- --config.train.num_steps=20000. README reports that
#                  the narrow micro/nano DiTs learned only with x0-prediction in short runs; to try that at full length:
#                  --sizes=nano,micro -- --config.model.prediction=x0 --config.train.t_logit_mean=0

set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENCODERS=rte,rte_nopos,t5,minilm
SIZES=nano,micro,mini,b

opt_root=workdirs/paper opt_launcher=local opt_encoders=$ENCODERS opt_sizes=$SIZES opt_t5_path="" opt_gpus_per_job=1
parse_args "$@"

check() {  # check FLAG ALLOWED ITEM...: each ITEM is one of the comma-separated ALLOWED, and there is at least one
  local flag=$1 allowed=$2 item
  shift 2
  (($#)) || die "--$flag is empty; give a comma-separated subset of $allowed."
  for item in "$@"; do
    [[ ,$allowed, == *,"$item",* ]] || die "unknown item '$item' in --$flag; use a comma-separated subset of $allowed."
  done
}

IFS=, read -ra encoders <<<"$opt_encoders"
IFS=, read -ra sizes <<<"$opt_sizes"
check encoders "$ENCODERS" "${encoders[@]}"
check sizes "$SIZES" "${sizes[@]}"
[[ $opt_launcher == local || $opt_launcher == slurm ]] || die "unknown --launcher=$opt_launcher; use local or slurm."
if [[ ,$opt_encoders, == *,t5,* && -z $opt_t5_path ]]; then
  die "the t5 runs need --t5_path=DIR, a local copy of google/t5-v1_1-xxl (nothing is downloaded); or leave t5 out:" \
    "--encoders=rte,rte_nopos,minilm."
fi
root=$(absolute "${opt_root%/}")
t5_path=$(absolute "$opt_t5_path")
cache_dir=$root/compilation_cache
cd "$REPO"

JOB=""
submit() {  # submit PLACEHOLDER SBATCH_ARGS...: `sbatch --parsable`, printed like run; JOB = its id (or PLACEHOLDER)
  local placeholder=$1
  shift
  echo "+ $(quote sbatch --parsable "$@")"
  if ((DRY_RUN)); then JOB=$placeholder; else JOB=$(sbatch --parsable "$@"); JOB=${JOB%%;*}; fi
}

stage() {  # stage RUN MODE MAIN_FLAGS...: relcirc_jax.main --mode=MODE on configs/RUN.py, here or as a SLURM job
  local name=$1 mode=$2
  shift 2
  local where=(--config="configs/$name.py" --workdir="$root/$name" --mode="$mode")
  if [[ $opt_launcher == local ]]; then
    run python3 -m relcirc_jax.main "${where[@]}" --config.compilation_cache_dir="$cache_dir" "$@"
  else
    local after=()
    [[ $mode == train ]] || after=(--dependency=afterok:"$JOB" --kill-on-invalid-dep=yes)
    submit "$name.$mode" "${after[@]}" --job-name="relcirc-$name-$mode" --nodes=1 --gpus-per-node="$opt_gpus_per_job" \
      launch/slurm_gpu.sbatch "${where[@]}" --compilation_cache_dir="$cache_dir" -- "$@"
  fi
}

last_jobs=()
for encoder in "${encoders[@]}"; do
  for size in "${sizes[@]}"; do
    name=${encoder}_dit_${size}
    flags=()
    [[ $encoder == t5 ]] && flags+=(--config.text.t5_path="$t5_path")
    flags+=("${EXTRA_ARGS[@]}")
    stage "$name" train "${flags[@]}"
    stage "$name" evaluate "${flags[@]}"
    stage "$name" analyze --config.analysis.kind=all "${flags[@]}"
    last_jobs+=("$JOB")
  done
done

report=(python3 launch/paper_report.py --root="$root" --encoders="$opt_encoders" --sizes="$opt_sizes")
if [[ $opt_launcher == local ]]; then
  run "${report[@]}"
else
  submit report --dependency=afterany:"$(IFS=:; echo "${last_jobs[*]}")" --job-name=relcirc-report \
    --wrap="$(quote "${report[@]}")"
fi
echo "# report: $root/report.md"
