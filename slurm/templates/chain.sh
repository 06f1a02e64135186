#!/usr/bin/env bash
# Submit kdscale's stages with plain sbatch, chained afterok (what launch/submit.py does with submitit).
#
#   SHARD_TASKS=4 WIDE="--nodes=4 --ntasks-per-node=8 --gpus-per-node=8" \
#     bash slurm/templates/chain.sh RUN/config.yaml [-- sbatch options for every job, e.g. --partition=gpu]
#
# RUN/config.yaml is the resolved config:
#   mkdir -p RUN && kdscale config --cfg configs/mind.yaml run.out_dir=RUN > RUN/config.yaml
# WIDE is the layout of the softlabels and train jobs (one task per GPU); every other job is 1 task.
# A failed job cancels its dependants (--kill-on-invalid-dep=yes). Logs: RUN/slurm/*.out.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CFG="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; shift
[ "${1:-}" = "--" ] && shift
EXTRA=("$@")
read -r -a WIDE_ARGS <<< "${WIDE:-}"
SHARD_TASKS="${SHARD_TASKS:-1}"
PY="${KDSCALE_PY:-$ROOT/.venv/bin/python}"
TEACHERS="$("$PY" -c "import sys; from kdscale.schema import load_config; print(len(load_config(sys.argv[1]).teachers.members))" "$CFG")"
LOGS="$(dirname "$CFG")/slurm"; mkdir -p "$LOGS"
sub() {  # sub [sbatch options...] TEMPLATE: the job id
  sbatch --parsable --chdir "$ROOT" --export="ALL,CFG=$CFG,NUM_TASKS=$SHARD_TASKS,KDSCALE_ROOT=$ROOT" \
    --kill-on-invalid-dep=yes "${EXTRA[@]}" "$@" | cut -d';' -f1
}
j=$(sub --array="0-$((SHARD_TASKS - 1))" -o "$LOGS/shards-%A_%a.out" "$HERE/shards.sbatch"); echo "shards         $j"
j=$(sub --dependency="afterok:$j" -o "$LOGS/shards-verify-%j.out" "$HERE/shards_verify.sbatch"); echo "shards-verify  $j"
if [ "$TEACHERS" -gt 0 ]; then
  j=$(sub --dependency="afterok:$j" --array="0-$((TEACHERS - 1))" -o "$LOGS/teachers-%A_%a.out" "$HERE/teachers.sbatch")
  echo "teachers       $j"
  j=$(sub --dependency="afterok:$j" "${WIDE_ARGS[@]}" -o "$LOGS/softlabels-%j.out" "$HERE/softlabels.sbatch")
  echo "softlabels     $j"
fi
j=$(sub --dependency="afterok:$j" "${WIDE_ARGS[@]}" -o "$LOGS/train-%j.out" "$HERE/train.sbatch"); echo "train          $j"
j=$(sub --dependency="afterok:$j" -o "$LOGS/eval-%j.out" "$HERE/eval.sbatch"); echo "eval           $j"
echo "logs: $LOGS/   state: sacct -X -j <ids> -o JobID,JobName%20,State,ExitCode"
