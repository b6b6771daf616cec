#!/usr/bin/env bash
# Create (or reuse) the project environment in .venv: the pinned torch set, every third-party
# dependency from constraints.txt, and the five mmr distributions as editable installs.
# Idempotent: a stamp of constraints.txt and every pyproject.toml skips the work when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${MMR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

stamp_now() {
  cat constraints.txt shared/pyproject.toml packages/*/pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1
}

# LLaMA's SentencePiece vocabulary for the LLaVA golden tokenization tests (issue #12). No wheel ships
# Meta's tokenizer.model; the llama-cpp-python sdist carries it as GGUF (pieces, scores, types) beside
# llama.cpp's test texts and the ids LLaMA's tokenizer gives them. Take those three files only (the sdist
# is never built or installed) into the environment, never into git (Meta's vocabulary, Meta's licence).
# Runs on every setup, a no-op once the files are there with these hashes, so a failed download is retried.
LLAMA_SPM_SDIST_VERSION=0.3.36
LLAMA_SPM_DIR="$VENV/share/mmr/llama-spm"
LLAMA_SPM_SHA256="\
16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69  ggml-vocab-llama-spm.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-llama-spm.gguf.inp
ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29  ggml-vocab-llama-spm.gguf.out"
fetch_llama_spm_vocabulary() {
  if [ -d "$LLAMA_SPM_DIR" ] && (cd "$LLAMA_SPM_DIR" && sha256sum --check --status <<<"$LLAMA_SPM_SHA256" 2>/dev/null); then
    return 0
  fi
  local tmp models="llama_cpp_python-$LLAMA_SPM_SDIST_VERSION/vendor/llama.cpp/models"
  tmp="$(mktemp -d)"
  echo "[setup] fetching LLaMA's SentencePiece vocabulary from the llama-cpp-python==$LLAMA_SPM_SDIST_VERSION sdist (77 MB, three files kept)"
  if "${PIP[@]}" download --quiet --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LLAMA_SPM_SDIST_VERSION" \
     && tar -xzf "$tmp/llama_cpp_python-$LLAMA_SPM_SDIST_VERSION.tar.gz" -C "$tmp" \
          "$models/ggml-vocab-llama-spm.gguf" "$models/ggml-vocab-llama-spm.gguf.inp" "$models/ggml-vocab-llama-spm.gguf.out" \
     && (cd "$tmp/$models" && sha256sum --check --quiet <<<"$LLAMA_SPM_SHA256"); then
    mkdir -p "$LLAMA_SPM_DIR"
    mv -f "$tmp/$models"/ggml-vocab-llama-spm.gguf* "$LLAMA_SPM_DIR/"
    echo "[setup] LLaMA's SentencePiece vocabulary in $LLAMA_SPM_DIR"
  else
    echo "[setup] WARNING: could not fetch LLaMA's SentencePiece vocabulary (llama-cpp-python==$LLAMA_SPM_SDIST_VERSION" \
         "sdist from PyPI); the LLaVA golden tokenization tests on it skip (fail under CI) until" \
         "'bash scripts/setup_env.sh' succeeds, or set MMR_LLAMA_SPM_DIR to a folder holding the three files"
  fi
  rm -rf "$tmp"
}

# Debian's Chromium and its WebDriver for the LLaVA web demo's browser test (nox session `browser`), installed
# only when missing and when we may (root with apt-get); otherwise say so (the test then fails in CI).
install_chromium() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages chromium and chromium-driver (the LLaVA demo's browser test)"
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null); then
      echo "[setup] WARNING: apt-get could not install chromium chromium-driver; the browser test will fail"
    fi
  else
    echo "[setup] note: chromium and chromedriver are missing; install the Debian/Ubuntu packages chromium and" \
         "chromium-driver (as root) for the LLaVA demo's browser test (nox -s browser)"
  fi
}

if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.mmr-stamp" ] && [ "$(cat "$VENV/.mmr-stamp")" = "$(stamp_now)" ]; then
  echo "[setup] reusing $VENV (up to date)"
  fetch_llama_spm_vocabulary
  install_chromium
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
# torch first and alone: its wheel is the large one and every other package must see it already.
echo "[setup] installing the pinned torch set (torch, torchvision, torchaudio)"
"${PIP[@]}" install -c constraints.txt torch torchvision torchaudio
echo "[setup] installing third-party dependencies and the mmr distributions (editable)"
"${PIP[@]}" install -c constraints.txt \
  -e "./shared[test]" -e "./packages/imagebind[test]" -e "./packages/medvlm[test]" -e "./packages/mmcot[test]" \
  -e "./packages/llava[test]" \
  pytest pytest-timeout nox ruff hatchling editables build
# The real blood-smear photo for the MedVLM miniature lives in the `cbc` wheel, which pins dozens of
# old packages exactly: take the file only, never its dependencies (mmr_medvlm never imports cbc).
"${PIP[@]}" install -c constraints.txt --no-deps cbc
# The LLaVA web demo and its browser test: gradio caps pillow<13, below our pin, so gradio itself comes without
# its dependencies and these, its other requirements, pinned in constraints.txt (see there); selenium drives
# Chromium.
"${PIP[@]}" install -c constraints.txt selenium anyio brotli fastapi gradio-client groovy hf-gradio httpx \
  huggingface-hub jinja2 markupsafe numpy orjson packaging pandas pydantic pydub python-multipart pytz pyyaml \
  safehttpx semantic-version starlette typer typing-extensions uvicorn
"${PIP[@]}" install -c constraints.txt --no-deps gradio
fetch_llama_spm_vocabulary
install_chromium
"$VENV/bin/python" - <<'PY'
import torch, torchvision, torchaudio  # noqa: F401  (fails loudly if the pinned set is broken)
import mmr_core, mmr_imagebind, mmr_llava, mmr_medvlm, mmr_mmcot  # noqa: F401
import gradio, selenium  # noqa: F401  (the LLaVA demo and its browser test)
print(f"[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, torchaudio {torchaudio.__version__}")
PY
stamp_now > "$VENV/.mmr-stamp"
echo "[setup] done in $(( $(date +%s) - start )) s; size $(du -sh "$VENV" | cut -f1)"
