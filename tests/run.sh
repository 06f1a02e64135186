#!/usr/bin/env bash
# README command 2: set up the environment, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/launch/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
