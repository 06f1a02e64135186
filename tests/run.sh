#!/usr/bin/env bash
# README command 2: set up the environment, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/launch/env.sh"
cd "$ROOT"
# Imports only point down the layers of docs/design.md (also tests/test_layers.py); < 1 s, so it
# runs first and on every invocation, whatever subset of tests the arguments select.
python -m kdscale.devtools.check_layers
exec python -m pytest -q "$@"
