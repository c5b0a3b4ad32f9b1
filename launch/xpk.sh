#!/usr/bin/env bash
# Train on TPU slices of a GKE cluster through xpk (pip install xpk; the cluster exists already, see `xpk cluster
# create`). xpk builds a container from this checkout on --base_image, submits one workload whose pods all run
# `python3 -m relcirc_jax.main --distributed` (jax.distributed.initialize auto-detects the slice), then waits for it.
#
# Usage (from anywhere; the repository is this script's parent directory):
#   launch/xpk.sh --cluster=my-cluster --workload=rte-dit-b --config=configs/rte_dit_b.py \
#       --workdir=gs://BUCKET/runs/rte_dit_b [--tpu_type=v5litepod-16] [--num_slices=1] [--project=P] [--zone=Z] \
#       [--base_image=python:3.11] [--compilation_cache_dir=gs://BUCKET/xla_cache] [--dry-run] [-- MAIN_FLAGS...]
#
#   --dry-run      print the xpk commands instead of running them
#   --workdir      must be gs://...: the pods share no disk
#   after --        flags for relcirc_jax.main, e.g. -- --config.train.num_steps=20000
# Logs: xpk prints a Cloud Logging link on submission; `kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=WORKLOAD`
# follows process 0 and its peers.

set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

opt_cluster="" opt_workload="" opt_config="" opt_workdir="" opt_project="" opt_zone=""
opt_tpu_type=v5litepod-16 opt_num_slices=1 opt_base_image=python:3.11 opt_compilation_cache_dir=""
parse_args "$@"
require cluster workload config workdir
[[ $opt_workdir == gs://* ]] || die "--workdir=$opt_workdir must be a gs:// path: the pods of a workload share no disk."
cache_dir=${opt_compilation_cache_dir:-${opt_workdir%/}/compilation_cache}

where=(--cluster="$opt_cluster")
[[ -n $opt_project ]] && where+=(--project="$opt_project")
[[ -n $opt_zone ]] && where+=(--zone="$opt_zone")

train=(python3 -m relcirc_jax.main --config="$opt_config" --workdir="$opt_workdir" --mode=train --distributed
       --config.compilation_cache_dir="$cache_dir" "${EXTRA_ARGS[@]}")
command="pip install -q -e . \"jax[tpu]\" \"etils[epath-gcs]\" google-cloud-storage && $(quote "${train[@]}")"
run xpk workload create "${where[@]}" --workload="$opt_workload" --tpu-type="$opt_tpu_type" \
  --num-slices="$opt_num_slices" --base-docker-image="$opt_base_image" --script-dir="$REPO" --command="$command"
run xpk workload list "${where[@]}" --wait-for-job-completion="$opt_workload"
