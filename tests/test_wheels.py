"""Publishable wheels: one version number, ``mmr-core`` as a version range, an install from wheels alone.

The fast tests read the build configuration. The slow one runs ``python -m build`` (sdist, then the wheel
from the sdist, as a release would) for the five distributions, checks the wheels' metadata, installs
``mmr-core`` and ``mmr-llava`` from their wheels into a new virtual environment and runs ``mmr-llava chat`` there.

How the new environment gets its third-party packages (torch, transformers, ...): a path entry in a ``.pth``
file to the site-packages holding this environment's torch. Copying 6 GB of pinned wheels per run is not
possible on the CI machine, and ``--system-site-packages`` would make the checkout's own (editable) mmr
distributions importable too, so the test would not show that the wheels hold the code. A plain path entry
does not run that folder's ``.pth`` files, which is where editable installs live: the test checks that
``mmr_core`` does *not* import in the new environment before the wheels go in, that afterwards ``mmr_core``
and ``mmr_llava`` import from the new environment's own site-packages, and that every requirement the
``mmr-llava`` wheel declares (``mmr-core`` range included) is met there. The wheels are installed with
``--no-index --no-deps``, so nothing comes from a package index or from the checkout.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imagebind", "medvlm", "mmcot", "llava")
DISTRIBUTIONS = {"mmr-core": ROOT / "shared", **{f"mmr-{p}": ROOT / "packages" / p for p in PACKAGES}}
VERSION_FILE = ROOT / "shared" / "src" / "mmr_core" / "_version.py"


def _the_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"$', VERSION_FILE.read_text(), re.M)
    assert match, f"{VERSION_FILE} must hold one line __version__ = \"X.Y.Z\""
    return match.group(1)


def _hook_module():
    """The packages' hatch_build.py (all four are one file, checked below), imported for its function."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mmr_hatch_build", ROOT / "packages" / "llava" / "hatch_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_version_source():
    """No pyproject states a version; the four packages read mmr-core's version file, mmr-core its own."""
    for name, folder in DISTRIBUTIONS.items():
        pyproject = tomllib.loads((folder / "pyproject.toml").read_text())
        assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"], name
        version_path = (folder / pyproject["tool"]["hatch"]["version"]["path"]).resolve()
        assert version_path == VERSION_FILE, name
    Version(_the_version())  # a valid PEP 440 version


def test_packages_require_mmr_core_as_a_range_not_a_path():
    """No direct reference (``name @ url``) anywhere; the hook puts the range first, the pyproject the rest."""
    for name, folder in DISTRIBUTIONS.items():
        text = (folder / "pyproject.toml").read_text()
        assert " @ " not in text and "file:" not in text and "{root" not in text, name
        if name == "mmr-core":
            continue
        pyproject = tomllib.loads(text)
        assert "dependencies" in pyproject["project"]["dynamic"] and "dependencies" not in pyproject["project"]
        listed = pyproject["tool"]["hatch"]["metadata"]["hooks"]["custom"]["dependencies"]
        assert not any(Requirement(r).name == "mmr-core" for r in listed), name


def test_hook_files_are_one_file():
    """Each package carries the hook (a build reads it from the package folder); the four copies are equal."""
    texts = {p: (ROOT / "packages" / p / "hatch_build.py").read_bytes() for p in PACKAGES}
    assert len(set(texts.values())) == 1, "packages/*/hatch_build.py differ; copy one over the others"


def test_mmr_core_requirement_range():
    requirement = _hook_module().mmr_core_requirement
    assert requirement("0.1.0") == "mmr-core>=0.1.0,<0.2"
    assert requirement("0.9.3") == "mmr-core>=0.9.3,<0.10"
    assert requirement("1.4.2") == "mmr-core>=1.4.2,<2"
    assert requirement("0.2.0.dev1") == "mmr-core>=0.2.0,<0.3"
    spec = Requirement(requirement(_the_version())).specifier
    assert _the_version() in spec and "0.0.1" not in spec


def test_installed_versions_are_the_one_version():
    """Each import package reports the installed distribution's version, which is the one version."""
    import importlib

    for name in DISTRIBUTIONS:
        module = importlib.import_module(name.replace("-", "_"))
        assert module.__version__ == _the_version(), name


# -- slow: build, install into a new environment, chat ----------------------------------------------------

def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """The five wheels from ``python -m build`` (sdist, then wheel from the unpacked sdist).

    ``--no-isolation``: the build backend (hatchling, pinned) comes from this environment instead of a download.
    """
    out = tmp_path_factory.mktemp("dist")
    for folder in DISTRIBUTIONS.values():
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(folder)])
    found = {}
    for name in DISTRIBUTIONS:
        matches = list(out.glob(f"{name.replace('-', '_')}-{_the_version()}-py3-none-any.whl"))
        assert len(matches) == 1, f"{name}: {sorted(p.name for p in out.iterdir())}"
        assert list(out.glob(f"{name.replace('-', '_')}-{_the_version()}.tar.gz")), f"{name}: no sdist"
        found[name] = matches[0]
    return found


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_string(zf.read(name).decode())


@pytest.mark.slow
def test_wheel_metadata(wheels):
    version = _the_version()
    for name, wheel in wheels.items():
        meta = _metadata(wheel)
        assert meta["Name"] == name and meta["Version"] == version
        requirements = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
        assert all(r.url is None for r in requirements), f"{name}: a direct reference in {requirements}"
        core = [r for r in requirements if r.name == "mmr-core"]
        if name == "mmr-core":
            assert not core
            continue
        assert len(core) == 1 and core[0].marker is None, name
        # The range admits this version and its patch releases, not the next minor release (0.x: may break).
        assert version in core[0].specifier and f"{Version(version).major}.{Version(version).minor}.99" in core[0].specifier
        assert f"{Version(version).major}.{Version(version).minor + 1}.0" not in core[0].specifier
        with zipfile.ZipFile(wheel) as zf:
            top = {n.split("/")[0] for n in zf.namelist()}
        assert name.replace("-", "_") in top and not any(t in top for t in ("tests", "shared", "packages")), top


_REQUIREMENTS_MET = """
import importlib.metadata as md, sys
from packaging.requirements import Requirement
unmet = []
for line in md.requires(sys.argv[1]) or []:
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement
    try:
        have = md.version(r.name)
    except md.PackageNotFoundError:
        have = None
    if have is None or not r.specifier.contains(have, prereleases=True):
        unmet.append(f"{line} (have {have})")
print("\\n".join(unmet))
sys.exit(1 if unmet else 0)
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_llava_from_wheels_in_a_new_environment_chats(wheels, tmp_path):
    """``mmr-core`` + ``mmr-llava`` from their wheels only; ``mmr-llava train`` then ``chat`` there.

    The reply equals the one the development install gives for the same model and greedy settings.
    """
    import torch

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    third_party = Path(torch.__file__).resolve().parents[1]
    (site / "_third_party.pth").write_text(f"{third_party}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MMR_NO_PROGRESS="1", PYTHONNOUSERSITE="1")

    # The checkout's editable mmr installs must be invisible, or the test would not test the wheels.
    probe = subprocess.run([str(python), "-c", "import mmr_core"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'mmr_core'" in probe.stderr, probe

    # pip of this environment installs into the new one; no index, no dependencies resolved from anywhere.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
          "--no-index", "--no-deps", str(wheels["mmr-core"]), str(wheels["mmr-llava"])], env=env)
    where = _run([str(python), "-c", "import mmr_core, mmr_llava; print(mmr_core.__file__); print(mmr_llava.__file__)"],
                 env=env, cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    _run([str(python), "-c", _REQUIREMENTS_MET, "mmr-llava"], env=env, cwd=tmp_path)

    # A tiny model trained by the installed console script (1 step on the miniature's scenes).
    data = tmp_path / "data"
    _run([str(python), "-c", "import sys; from mmr_llava.miniature.scenes import write_dataset; "
          "write_dataset(sys.argv[1], n_scenes=4, seed=3)", str(data)], env=env, cwd=tmp_path)
    image = sorted((data / "images").glob("*.png"))[0]
    _run([str(venv / "bin" / "mmr-llava"), "train", "model=tiny", f"data={data / 'instruct.json'}",
          f"image_folder={data}", f"output_dir={tmp_path / 'run'}", "max_steps=1", "micro_batch_size=4",
          "tokenizer_vocab=200"], env=env, cwd=tmp_path)
    chat = ["chat", "--model", str(tmp_path / "run" / "model"), "--image", str(image), "--prompt", "What color?",
            "--max-new-tokens", "6"]
    from_wheels = _run([str(venv / "bin" / "mmr-llava"), *chat], env=env, cwd=tmp_path).stdout
    development = _run([sys.executable, "-m", "mmr_llava.cli", *chat], env=env, cwd=tmp_path).stdout
    assert from_wheels.strip() and from_wheels == development
