#!/usr/bin/env bash
# Create (or reuse) the project environment in .venv: the pinned torch set, every third-party
# dependency from constraints.txt, and the five mmr distributions as editable installs.
# Idempotent: a stamp of constraints.txt and every pyproject.toml skips the work when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${MMR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

stamp_now() {
  cat constraints.txt shared/pyproject.toml packages/*/pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1
}

if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.mmr-stamp" ] && [ "$(cat "$VENV/.mmr-stamp")" = "$(stamp_now)" ]; then
  echo "[setup] reusing $VENV (up to date)"
  exit 0
fi

start=$(date +%s)
# System data the miniature reproductions read: real recordings from Debian's sound theme
# (mmr_imagebind). Installed when we may (root with apt-get); otherwise say what is missing.
SOUNDS=/usr/share/sounds/freedesktop/stereo
if [ ! -d "$SOUNDS" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian package sound-theme-freedesktop (recordings for the ImageBind miniature)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sound-theme-freedesktop >/dev/null
  else
    echo "[setup] note: $SOUNDS is missing; install the Debian/Ubuntu package sound-theme-freedesktop" \
         "(or set MMR_FREEDESKTOP_SOUNDS) for the ImageBind miniature reproduction"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# torch first and alone: its wheel is the large one and every other package must see it already.
echo "[setup] installing the pinned torch set (torch, torchvision, torchaudio)"
"${PIP[@]}" install -c constraints.txt torch torchvision torchaudio
echo "[setup] installing third-party dependencies and the mmr distributions (editable)"
MMR_CORE_REQUIREMENT=mmr-core "${PIP[@]}" install -c constraints.txt \
  -e "./shared[test]" -e "./packages/imagebind[test]" -e "./packages/medvlm[test]" -e "./packages/mmcot[test]" \
  -e "./packages/llava[test]" \
  pytest pytest-timeout nox ruff hatchling editables
# The real blood-smear photo for the MedVLM miniature lives in the `cbc` wheel, which pins dozens of
# old packages exactly: take the file only, never its dependencies (mmr_medvlm never imports cbc).
"${PIP[@]}" install -c constraints.txt --no-deps cbc
"$VENV/bin/python" - <<'PY'
import torch, torchvision, torchaudio  # noqa: F401  (fails loudly if the pinned set is broken)
import mmr_core, mmr_imagebind, mmr_llava, mmr_medvlm, mmr_mmcot  # noqa: F401
print(f"[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, torchaudio {torchaudio.__version__}")
PY
stamp_now > "$VENV/.mmr-stamp"
echo "[setup] done in $(( $(date +%s) - start )) s; size $(du -sh "$VENV" | cut -f1)"
