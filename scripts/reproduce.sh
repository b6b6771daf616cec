#!/usr/bin/env bash
# The README's first command: create the environment if needed (idempotent), then run the main job,
# every miniature reproduction, into one report. Arguments go to scripts/reproduce.py,
# e.g. `bash scripts/reproduce.sh --only imagebind`, or `--jobs 1` to run the steps one after the other
# (default: as many at once as there are CPU cores, each step's output in its log).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
exec "$ROOT/.venv/bin/python" scripts/reproduce.py "$@"
