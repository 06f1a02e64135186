# Sourced by the kdscale sbatch templates: the same environment launch/submit.py gives its jobs.
# KDSCALE_ROOT: the repository (default: the submit directory); KDSCALE_PY: its venv python.
KDSCALE_ROOT="${KDSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
KDSCALE_PY="${KDSCALE_PY:-$KDSCALE_ROOT/.venv/bin/python}"
if [ ! -x "$KDSCALE_PY" ]; then
  echo "kdscale: no python at $KDSCALE_PY (run 'bash launch/env.sh' in $KDSCALE_ROOT, or set KDSCALE_ROOT/KDSCALE_PY)" >&2
  exit 2
fi
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
cd "$KDSCALE_ROOT" || exit 2
: "${CFG:?set CFG=<run dir>/config.yaml (sbatch --export=ALL,CFG=...)}"
# kdscale's own path rules, so the templates never disagree with the stages
kdscale_dir() {  # kdscale_dir shards|teachers|softlabels|run
  "$KDSCALE_PY" - "$CFG" "$1" <<'PY'
import sys
from pathlib import Path
from kdscale.schema import load_config
cfg = load_config(sys.argv[1])
what = sys.argv[2]
if what == "shards":
    from kdscale.data.shards import shards_out_dir; print(shards_out_dir(cfg))
elif what == "teachers":
    from kdscale.distill.teachers import teachers_dir; print(teachers_dir(cfg))
elif what == "softlabels":
    print(cfg.softlabels.out_dir or Path(cfg.run.out_dir) / "softlabels")
else:
    print(cfg.run.out_dir)
PY
}
