"""Test sessions: one per distribution (each in isolation), the LLaVA web demo in headless Chromium (`browser`),
the cross-package tests, and lint.

Each session gets its own virtual environment that installs *only* its distribution and
``mmr-core`` (editable, no dependencies). Third-party dependencies -- torch above all -- come from
the project environment ``.venv`` (see ``scripts/setup_env.sh``), which the session sees through a
plain path entry in a ``.pth`` file. A plain path does not execute that environment's own ``.pth``
files, so the other mmr distributions installed there stay invisible: a package that imports a
sibling fails here exactly as it would after ``pip install ./packages/<name>``.

Run ``nox -l`` to list sessions, ``nox -s llava`` for one, ``nox -s llava -- -m slow`` for its slow tests.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ("imagebind", "medvlm", "mmcot", "llava")
BROWSER_TESTS = "packages/llava/tests/browser"
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

TEST_ENV = {
    # Weights and datasets never come from a hub here; fail fast instead of hanging on the network.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "Agg",
    # LLaMA's SentencePiece vocabulary that scripts/setup_env.sh puts into the environment running nox.
    "MMR_LLAMA_SPM_DIR": str(Path(sysconfig.get_paths()["data"], "share", "mmr", "llama-spm")),
}


def _see_base_environment(session: nox.Session) -> None:
    """Make the third-party packages of the environment running nox importable in the session."""
    base_site = sysconfig.get_paths()["purelib"]
    session_site = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    ).strip()
    Path(session_site, "_mmr_base_env.pth").write_text(base_site + "\n")


def _install(session: nox.Session, *paths: str) -> None:
    _see_base_environment(session)
    editable = [arg for path in paths for arg in ("-e", str(ROOT / path))]
    session.run(
        "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--no-build-isolation", *editable,
    )


def _pytest(session: nox.Session, *test_dirs: str, env: dict[str, str] | None = None) -> None:
    args = session.posargs or ["-m", "not slow"]
    # With a user selection (e.g. `-- -m slow`) a session may hold no matching test: pytest's exit
    # code 5 is then not a failure. The default run must always collect tests.
    session.run(
        "python", "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
        "-ra", *test_dirs, *args, env={**TEST_ENV, **(env or {})}, success_codes=[0, 5] if session.posargs else [0],
    )


@nox.session
def core(session: nox.Session) -> None:
    """mmr-core alone: encoders, losses, WebDataset, DeepSpeed utilities."""
    _install(session, "shared")
    _pytest(session, "shared/tests")


def _package_session(name: str):
    def run(session: nox.Session) -> None:
        _install(session, "shared", f"packages/{name}")
        # The LLaVA web demo's browser test runs in its own session, `browser`.
        ignore = ["--ignore", str(ROOT / BROWSER_TESTS)] if name == "llava" else []
        _pytest(session, f"packages/{name}/tests", *ignore)

    run.__doc__ = f"mmr-{name} with mmr-core only (no sibling package importable)."
    run.__name__ = name
    return nox.session(name=name)(run)


for _name in PACKAGES:
    globals()[_name] = _package_session(_name)


@nox.session
def browser(session: nox.Session) -> None:
    """`mmr-llava demo` in headless Chromium (Debian's chromium + chromium-driver, selenium), mmr-llava only.

    Chromium, its driver, Gradio and selenium come from scripts/setup_env.sh; here their absence fails the
    test instead of skipping it.
    """
    _install(session, "shared", "packages/llava")
    _pytest(session, BROWSER_TESTS, env={"MMR_REQUIRE_BROWSER": "1"})


@nox.session
def repo(session: nox.Session) -> None:
    """Cross-package rules (import direction, configs, infra dry-runs) with every distribution installed."""
    _install(session, "shared", *(f"packages/{name}" for name in PACKAGES))
    _pytest(session, "tests")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole repository with the root configuration."""
    _see_base_environment(session)
    session.run("python", "-m", "ruff", "check", str(ROOT), env={"RUFF_CACHE_DIR": str(ROOT / ".ruff_cache")})

