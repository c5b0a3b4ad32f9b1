#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create the TPU VM if it does not exist yet (or reuse it), copy this checkout
# (git HEAD) to every worker and install it, then run `python3 -m relcirc_jax.main --distributed` on every worker and
# stream their logs. Every host joins one JAX job (jax.distributed.initialize auto-detects the TPU pod).
#
# Usage (from anywhere; the repository is this script's parent directory):
#   launch/tpu_pod.sh --name=relcirc-v5e16 --zone=us-west4-a --config=configs/rte_dit_b.py \
#       --workdir=gs://BUCKET/runs/rte_dit_b [--project=P] [--accelerator=v5litepod-16] [--version=RUNTIME] \
#       [--spot=true] [--worker=all] [--compilation_cache_dir=gs://BUCKET/xla_cache] [--dry-run] [-- MAIN_FLAGS...]
#
#   --dry-run      print the commands instead of running them
#   --worker       which workers run the job: all (default) or a list such as 0,1 (a pod needs all)
#   --accelerator  --version --spot: only used when the TPU VM must be created
#   --workdir      must be gs://... on a multi-host slice: the hosts share no disk
#   after --        flags for relcirc_jax.main, e.g. -- --config.train.num_steps=20000

set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

opt_name="" opt_zone="" opt_project="" opt_config="" opt_workdir="" opt_worker=all
opt_accelerator=v5litepod-16 opt_version=v2-alpha-tpuv5-lite opt_spot=false opt_compilation_cache_dir=""
parse_args "$@"
require name zone config workdir
[[ $opt_workdir == gs://* ]] || echo "warning: --workdir=$opt_workdir is not on gs://; a multi-host slice needs a" \
  "shared bucket for checkpoints." >&2
cache_dir=${opt_compilation_cache_dir:-${opt_workdir%/}/compilation_cache}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$opt_zone")
[[ -n $opt_project ]] && where+=(--project="$opt_project")
tarball=${TMPDIR:-/tmp}/relcirc_jax-$$.tar.gz
remote_dir=relcirc_jax

# 1. Reuse the TPU VM, or create it.
if ((DRY_RUN)); then
  echo "# if the describe fails, the TPU VM is created:"
  run "${gcloud_tpu[@]}" describe "$opt_name" "${where[@]}"
fi
if ((DRY_RUN)) || ! "${gcloud_tpu[@]}" describe "$opt_name" "${where[@]}" >/dev/null 2>&1; then
  create=("${gcloud_tpu[@]}" create "$opt_name" "${where[@]}" --accelerator-type="$opt_accelerator"
          --version="$opt_version")
  [[ $opt_spot == true ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. Copy git HEAD to every worker and install it with the TPU build of jax.
run git -C "$REPO" archive --format=tar.gz --output="$tarball" HEAD
run "${gcloud_tpu[@]}" scp "$tarball" "$opt_name:relcirc_jax.tar.gz" "${where[@]}" --worker="$opt_worker"
install="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf relcirc_jax.tar.gz -C $remote_dir"
install+=" && pip install -q -e ./$remote_dir \"jax[tpu]\" \"etils[epath-gcs]\" google-cloud-storage"
run "${gcloud_tpu[@]}" ssh "$opt_name" "${where[@]}" --worker="$opt_worker" --command="$install"

# 3. Train: the same command on every worker; gcloud streams all their outputs here.
train=(python3 -m relcirc_jax.main --config="$opt_config" --workdir="$opt_workdir" --mode=train --distributed
       --config.compilation_cache_dir="$cache_dir" "${EXTRA_ARGS[@]}")
run "${gcloud_tpu[@]}" ssh "$opt_name" "${where[@]}" --worker="$opt_worker" \
  --command="cd $remote_dir && $(quote "${train[@]}")"
