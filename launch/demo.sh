#!/usr/bin/env bash
# README command 1: set up the environment, then run the kdscale pipeline on the embedded
# default (generated demo data, local execution). Extra arguments are config overrides.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/launch/env.sh"
cd "$ROOT"
exec kdscale pipeline --cfg configs/demo.yaml "$@"
