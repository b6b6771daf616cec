#!/usr/bin/env bash
# The README's second command: create the environment if needed, then run every nox session
# (one per distribution in isolation, the LLaVA web demo in headless Chromium (`browser`), the cross-package
# tests, lint). Extra arguments go to nox,
# e.g. `bash scripts/test.sh -s llava` or `bash scripts/test.sh -s core -- -m slow`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
start=$(date +%s)
"$ROOT/.venv/bin/python" -m nox --noxfile "$ROOT/noxfile.py" "$@"
echo "[test] all sessions finished in $(( $(date +%s) - start )) s"
