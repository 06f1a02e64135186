#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the pinned stack.
# Idempotent: a stamp file records the hash of setup.cfg; nothing is reinstalled
# while it matches. Source it (`. launch/env.sh`) to get the venv on PATH.
#
# KDSCALE_VENV=system uses the interpreter already on PATH instead (a cluster's module-provided or
# a GPU image's CUDA torch, where no package index can be reached): nothing is created or
# installed; the import check below names what is missing, and kdscale runs from this checkout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${KDSCALE_VENV:-}" = system ]; then
  PY="${PYTHON:-python3}"
  missing="$("$PY" - <<'PYEOF'
import importlib.util
need = ["torch", "torchvision", "webdataset", "timm", "transformers", "accelerate", "yaml", "numpy", "PIL", "tqdm",
        "sklearn", "matplotlib"]
print(" ".join(name for name in need if importlib.util.find_spec(name) is None))
PYEOF
)"
  if [ -n "$missing" ]; then
    echo "[kdscale] KDSCALE_VENV=system: $PY lacks: $missing (install them, or unset KDSCALE_VENV)" >&2
    return 1 2>/dev/null || exit 1
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  return 0 2>/dev/null || exit 0
fi
VENV="${KDSCALE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.kdscale-installed"
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[kdscale] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[kdscale] installing pinned packages (first run takes ~1-2 minutes)" >&2
  # torch first and pinned: an unpinned resolution pulls the CUDA build and GBs of nvidia-* wheels.
  # pip's output goes to a log, so a failed install stops here (and writes no stamp).
  log="$VENV/pip-install.log"
  pip_install() {
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
      grep -v "is ignored" "$log" | tail -20 >&2
      echo "[kdscale] pip install $* failed (full log: $log)" >&2
      exit 1
    fi
  }
  pip_install "torch==2.13.0"
  pip_install -e "$ROOT[test]"
  "$VENV/bin/python" -c "import kdscale" >/dev/null || { echo "[kdscale] installation failed" >&2; exit 1; }
  # Make `import timm`/`import torchvision` work in every process of this venv on CPU-only torch
  # (torchrun children, DataLoader workers, SLURM tasks), not only after `import kdscale`.
  "$VENV/bin/python" -c "import kdscale.compat as c; print('[kdscale] torchvision import hook:', c.install_pth())" >&2
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
