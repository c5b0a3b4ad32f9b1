# shellcheck shell=bash
# Shared helpers of the launch scripts (sourced, not run): --key=value parsing, --dry-run, readable command echo.
#
# A script sets its defaults as opt_<key>=... variables, then calls `parse_args "$@"`: every --key=value sets
# opt_<key> (only keys with a default may be given), --dry-run sets DRY_RUN=1, --help prints the script's header, and
# everything after `--` lands in EXTRA_ARGS (passed on to relcirc_jax.main, e.g. --config.train.num_steps=1000).

DRY_RUN=0
# shellcheck disable=SC2034  # read by the scripts that source this file
EXTRA_ARGS=()

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

usage() {  # the script's leading comment block
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  exit 0
}

parse_args() {
  local arg key
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      --help | -h) usage ;;
      --)
        # shellcheck disable=SC2034  # read by the scripts that source this file
        EXTRA_ARGS=("$@")
        return ;;
      --*=*)
        key=${arg%%=*}
        key=${key#--}
        key=${key//-/_}
        if ! [[ $key =~ ^[a-z][a-z0-9_]*$ ]] || ! declare -p "opt_${key}" >/dev/null 2>&1; then
          die "unknown option --${key}; see --help."
        fi
        printf -v "opt_${key}" '%s' "${arg#*=}" ;;
      *) die "unexpected argument '$arg'; options are --key=value (see --help), extra main.py flags go after --." ;;
    esac
  done
}

require() {  # require KEY...: each opt_KEY must be non-empty
  local key name
  for key in "$@"; do
    name="opt_${key}"
    [[ -n ${!name} ]] || die "missing --${key}=...; see --help."
  done
}

quote() {  # the arguments as one shell-readable line (single quotes only where needed)
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {  # run COMMAND...: prints it as "+ command"; executes it unless --dry-run
  echo "+ $(quote "$@")"
  ((DRY_RUN)) || "$@"
}

absolute() {  # a path or URL (gs://...) as seen from any directory: relative paths are taken from the current one
  if [[ $1 == /* || $1 == *://* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}
