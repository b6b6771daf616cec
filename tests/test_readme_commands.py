"""Every shell command in the READMEs runs as written, on tiny data.

The convention: each fenced ``bash``/``sh``/``shell``/``console`` block in ``README.md`` and
``packages/*/README.md`` is preceded (on the line right above the fence) by one marker comment, which
Markdown does not render::

    <!-- test: fast setup=llava_scenes sub="output_dir=runs/s1=>output_dir=runs/s1 max_steps=1" stdin="Hi" -->
    <!-- test: slow ... -->
    <!-- test: skip reason="downloads bert-base-uncased from the Hub" -->

* ``fast`` blocks run in the default test run, ``slow`` ones under ``-m slow`` (which runs a README's fast
  and slow blocks in order, as a reader would).
* ``setup=NAME`` (repeatable) runs one of :data:`SETUPS` first: it writes the tiny stand-ins for the files
  the block names (``captions.json``, ``cat.png``, a model folder called ``llava-v1.5-7b``, ...).
* ``sub="OLD=>NEW"`` (repeatable) is the tiny-data substitution: ``OLD`` must occur in the block (checked),
  and is replaced before running. Substitutions only shrink a run (``max_steps=1``), or name the CPU
  where the README names a GPU (``--device cuda`` -> ``--device cpu``); everything else runs as written.
  ``{free_port}`` in ``NEW`` becomes a free TCP port (the ``deepspeed`` launcher's default 29500 may be
  taken by another job on the machine).
* ``stdin="..."`` is fed to the block (an interactive chat reads it; without it stdin is empty).
* ``skip`` needs a ``reason``: what the block needs that a test cannot have (a download, a GPU cluster, an
  API key); :func:`test_every_command_block_is_marked` lists them, so none is forgotten.

All blocks of one README run in order in one scratch folder (a later block may read an earlier block's
output), with ``bash -euo pipefail``; the folder links the repository's top-level folders, so
``python packages/llava/train.py`` works as it does from the root. The environment is offline
(``HF_HUB_OFFLINE=1``) and CPU-only (``CUDA_VISIBLE_DEVICES=""``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    """One fenced shell block and its marker."""

    readme: Path
    line: int  # of the opening fence, 1-based
    text: str
    marker: str | None
    mode: str = ""
    setups: list[str] = field(default_factory=list)
    subs: list[tuple[str, str]] = field(default_factory=list)
    stdin: str = ""
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.readme.relative_to(ROOT)}:{self.line}"

    def script(self) -> str:
        text = self.text
        for old, new in self.subs:
            text = text.replace(old, new.replace("{free_port}", str(_free_port())))
        return text


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_blocks(readme: Path) -> list[Block]:
    """Fenced shell blocks of a README with the marker on the line above each (None when there is none)."""
    lines = readme.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(```+|~~~+)\s*([\w-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), len(lines))
        if fence.group(2) in SHELL_FENCES:
            above = lines[i - 1] if i > 0 else ""
            m = MARKER.match(above)
            block = Block(readme, i + 1, "\n".join(lines[i + 1:end]) + "\n", m.group(1) if m else None)
            if m:
                _read_marker(block)
            blocks.append(block)
        i = end + 1
    return blocks


def _read_marker(block: Block) -> None:
    words = shlex.split(block.marker)
    block.mode = words[0] if words else ""
    for word in words[1:]:
        key, _, value = word.partition("=")
        if key == "setup":
            block.setups.append(value)
        elif key == "sub":
            old, sep, new = value.partition("=>")
            if not sep:
                raise ValueError(f"{block.where}: sub needs OLD=>NEW, got {value!r}")
            block.subs.append((old, new))
        elif key == "stdin":
            block.stdin = value + "\n"
        elif key == "reason":
            block.reason = value
        else:
            raise ValueError(f"{block.where}: unknown marker key {key!r} (setup, sub, stdin, reason)")


ALL_BLOCKS = [b for readme in READMES for b in parse_blocks(readme)]


# -- setups: tiny stand-ins for the files the READMEs name -------------------------------------------------

def llava_scenes(cwd: Path) -> None:
    """``captions.json``, ``instruct.json`` (image paths relative to ``imgs/``), ``imgs/``, ``cat.png``."""
    from mmr_llava.miniature.scenes import write_dataset

    paths = write_dataset(cwd / "imgs", n_scenes=6, seed=0)
    for name in ("captions", "instruct"):
        shutil.move(paths[name], cwd / f"{name}.json")
    shutil.copy(sorted((cwd / "imgs" / "images").glob("*.png"))[0], cwd / "cat.png")


def llava_bench(cwd: Path) -> None:
    """A tiny trained model in a folder named ``llava-v1.5-7b`` (1 step; the name is the README's), a
    question file in the original's ``model_vqa`` format in ``llava-bench/`` and ``cat.png``."""
    import json

    from mmr_llava.miniature.scenes import write_dataset
    from mmr_llava.train import TrainConfig, train

    paths = write_dataset(cwd / "_scenes", n_scenes=4, seed=1)
    train(TrainConfig(model="tiny", data=str(paths["instruct"]), image_folder=str(cwd / "_scenes"),
                      output_dir=str(cwd / "_run"), micro_batch_size=4, max_steps=1, tokenizer_vocab=200))
    shutil.move(cwd / "_run" / "model", cwd / "llava-v1.5-7b")
    images = sorted((cwd / "_scenes" / "images").glob("*.png"))
    (cwd / "llava-bench" / "images").mkdir(parents=True)
    questions = []
    for k, image in enumerate(images[:3]):
        shutil.copy(image, cwd / "llava-bench" / "images" / image.name)
        questions.append({"question_id": k, "image": image.name, "text": "What is in the picture?"})
    (cwd / "llava-bench" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    shutil.copy(images[0], cwd / "cat.png")
    shutil.rmtree(cwd / "_run")


def imagebind_tiny(cwd: Path) -> None:
    """The ``tiny`` ImageBind as the README's two checkpoints: an official-format ``imagebind_huge.pth`` (the
    release is a plain state dict with our parameter names) and a ``save_pretrained`` folder ``imagebind-huge``."""
    import torch

    from mmr_imagebind.model import ImageBind, ImageBindConfig

    torch.manual_seed(0)
    model = ImageBind(ImageBindConfig.from_name("tiny")).eval()
    torch.save(model.state_dict(), cwd / "imagebind_huge.pth")
    model.save_pretrained(cwd / "imagebind-huge")


# A WordPiece vocabulary covering the blood-cell prompts (GLIP's tokenizer is BERT's; nothing is downloaded).
_BERT_VOCAB = ("[PAD] [UNK] [CLS] [SEP] [MASK] . , ? the of is a and small colorless platelet rounded fresh ##color "
               "red blood cell irregular purple or blue white").split()


def medvlm_blood(cwd: Path) -> None:
    """Blood-smear scenes as COCO (``data/instances.json``, ``data/images``), ``prompt.json``, a BERT
    tokenizer folder named ``bert-base-uncased`` (a tiny vocabulary; the README downloads the real one) and
    ``run.yaml``."""
    import yaml
    from transformers import BertTokenizerFast

    from mmr_medvlm.miniature.synthetic import blood_dataset
    from mmr_medvlm.prompts import ClassPrompt, PromptSet

    blood_dataset(cwd / "data", n=4, seed=0, size=64)
    PromptSet([ClassPrompt("platelet", shape="small", color="colorless"),
               ClassPrompt("rbc", name="red blood cell", shape="rounded", color="freshcolor"),
               ClassPrompt("wbc", name="white blood cell", shape="irregular", color="purple or blue")]
              ).save(cwd / "prompt.json")
    (cwd / "vocab.txt").write_text("\n".join(_BERT_VOCAB) + "\n")
    BertTokenizerFast(vocab=str(cwd / "vocab.txt"), do_lower_case=True).save_pretrained(str(cwd / "bert-base-uncased"))
    # The run.yaml the README's recipe lines read: these files, and the test-size model for 2 steps at the
    # images' own size instead of GLIP-T at 800x1333 for 1000 (the tiny stand-in's part).
    run = {"tokenizer": "bert-base-uncased", "train_annotations": "data/instances.json", "train_images": "data/images",
           "val_annotations": "data/instances.json", "val_images": "data/images", "prompt_file": "prompt.json",
           "model": "test", "max_steps": 2, "save_every": 2, "batch_size": 2, "min_size": None, "max_size": 128,
           "count_flops": False, "output_dir": "runs/recipe"}
    (cwd / "run.yaml").write_text(yaml.safe_dump(run))


def mmcot_scienceqa(cwd: Path) -> None:
    """A generated ScienceQA-format release in ``data/scienceqa`` (8 train, 4 test problems) with a PNG per
    image problem in ``images/<pid>/image.png``, a SentencePiece ``spiece.model`` trained on it and the
    ``run.yaml`` the README names (the ``tiny`` model on ViT-shaped features, one epoch)."""
    import json

    import numpy as np
    import yaml
    from PIL import Image

    from mmr_mmcot.miniature.synthetic import corpus, write_release
    from mmr_mmcot.tokenizer import train_sentencepiece

    files = write_release(cwd / "data" / "scienceqa", n_train=8, n_test=4, seed=3)
    problems = json.loads(files.problems.read_text())
    rng = np.random.default_rng(0)
    for pid, problem in problems.items():
        if problem.get("image"):
            folder = cwd / "data" / "scienceqa" / "images" / pid
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / problem["image"])
    train_sentencepiece(corpus(problems), cwd / "spiece.model", 160)
    run = {"model": "tiny", "vision": "vit", "tokenizer": "spiece.model", "problems": str(files.problems),
           "pid_splits": str(files.pid_splits), "captions": str(files.captions),
           "features": "vision_features/vit.npy", "name_map": "vision_features/name_map.json", "epochs": 1,
           "batch_size": 4, "eval_batch_size": 8, "lr": 1e-3, "source_len": 96, "rationale_len": 24,
           "answer_len": 8, "num_threads": 1}
    (cwd / "run.yaml").write_text(yaml.safe_dump(run))


SETUPS = {f.__name__: f for f in (llava_scenes, llava_bench, imagebind_tiny, medvlm_blood, mmcot_scienceqa)}


# -- running -------------------------------------------------------------------------------------------------

def _environment() -> dict[str, str]:
    import deepspeed

    # This interpreter's scripts first (mmr-llava, ...), then the project environment's (the deepspeed
    # launcher, which nox session venvs do not have).
    project_bin = Path(deepspeed.__file__).resolve().parents[4] / "bin"
    path = os.pathsep.join([str(Path(sys.executable).parent), str(project_bin), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MMR_NO_PROGRESS": "1",
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}


def _scratch(tmp_path: Path) -> Path:
    """A folder that looks like the repository root to the commands, with the data in it."""
    for entry in ("packages", "shared", "scripts", "infra", "bench", "docs", "constraints.txt", "noxfile.py"):
        (tmp_path / entry).symlink_to(ROOT / entry)
    return tmp_path


def run_blocks(blocks: list[Block], cwd: Path, timeout: int) -> None:
    env = _environment()
    for block in blocks:
        for setup in block.setups:
            SETUPS[setup](cwd)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.script()], cwd=cwd, env=env, input=block.stdin,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (f"{block.where} failed (exit {proc.returncode}):\n{block.script()}\n"
                                      f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")


def _readme_id(readme: Path) -> str:
    return str(readme.parent.relative_to(ROOT)) if readme.parent != ROOT else "root"


def test_every_command_block_is_marked():
    """Each shell block has a valid marker: a mode, known setups, substitutions that still match, a reason to skip."""
    problems = []
    for block in ALL_BLOCKS:
        if block.marker is None:
            problems.append(f"{block.where}: no '<!-- test: fast|slow|skip ... -->' line above the block")
            continue
        if block.mode not in ("fast", "slow", "skip"):
            problems.append(f"{block.where}: mode {block.mode!r} is not fast, slow or skip")
        if block.mode == "skip" and not block.reason:
            problems.append(f"{block.where}: a skipped block needs reason=\"...\"")
        problems += [f"{block.where}: unknown setup {s!r} (known: {sorted(SETUPS)})" for s in block.setups
                     if s not in SETUPS]
        problems += [f"{block.where}: sub {old!r} does not occur in the block" for old, _ in block.subs
                     if old not in block.text]
    assert not problems, "\n".join(problems)
    assert any(b.mode == "fast" for b in ALL_BLOCKS) and any(b.mode == "slow" for b in ALL_BLOCKS)


def test_the_readme_stage_2_command_names_its_image_folder():
    """The bug that started this test: LLaVA's stage-2 command lacked image_folder= (DataError at the first image)."""
    stage2 = [b for b in ALL_BLOCKS if "output_dir=runs/s2" in b.text]
    assert stage2 and all("image_folder=" in b.text for b in stage2)


@pytest.mark.parametrize("readme", [r for r in READMES if any(b.readme == r and b.mode == "fast" for b in ALL_BLOCKS)],
                         ids=_readme_id)
def test_fast_readme_commands_run(readme, tmp_path):
    run_blocks([b for b in ALL_BLOCKS if b.readme == readme and b.mode == "fast"], _scratch(tmp_path), timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("readme", [r for r in READMES if any(b.readme == r and b.mode == "slow" for b in ALL_BLOCKS)],
                         ids=_readme_id)
def test_all_readme_commands_run(readme, tmp_path):
    """Fast and slow blocks of one README, in the order a reader runs them."""
    run_blocks([b for b in ALL_BLOCKS if b.readme == readme and b.mode in ("fast", "slow")], _scratch(tmp_path),
               timeout=1800)
