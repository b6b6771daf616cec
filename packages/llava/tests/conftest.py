"""Shared fixtures: real 32,000-piece SentencePiece tokenizers.

``llama_tokenizer`` is mistral-common's ``tokenizer.model.v1`` (Mistral's vocabulary, built as LLaMA's).
The golden tokenization tests run on it and on LLaMA's own vocabulary (``sentencepiece_model_file``,
``golden_tokenizer``), which ``llama_spm_vocabulary`` rebuilds from the GGUF file setup puts into the
environment. Missing files skip with how to get them; under CI (which runs the setup) they fail instead.
"""

import os
import shutil
from pathlib import Path

import llama_spm_vocabulary as llama_spm
import pytest

SENTENCEPIECE_VOCABULARIES = ("mistral_v1", "llama_spm")


def _skip_or_fail(message: str) -> None:
    if os.environ.get("CI"):  # CI installs the test extra and runs the setup: a skip there would hide tests
        pytest.fail(message)
    pytest.skip(message)


def _mistral_v1_model() -> Path:
    try:
        import mistral_common
    except ImportError:
        mistral_common = None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1" if mistral_common else None
    if path is None or not path.is_file():
        _skip_or_fail("mistral-common (tokenizer.model.v1) not installed: pip install -e './packages/llava[test]'")
    return path


def _llama_spm_model(folder: Path) -> Path:
    vocabulary = llama_spm.vocabulary_dir()
    missing = llama_spm.missing_files(vocabulary)
    if missing:
        _skip_or_fail(f"LLaMA's SentencePiece vocabulary: {', '.join(missing)} not in {vocabulary}: "
                      f"{llama_spm.HOW_TO_GET}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        _skip_or_fail("gguf (reads LLaMA's vocabulary) not installed: pip install -e './packages/llava[test]'")
    return llama_spm.write_tokenizer_model(vocabulary / llama_spm.GGUF_NAME, folder)


def _load_llama_tokenizer(model_file: Path, folder: Path, legacy: bool):
    from transformers import LlamaTokenizer

    if model_file != folder / "tokenizer.model":
        shutil.copy(model_file, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=legacy)
    assert tokenizer.legacy is legacy and len(tokenizer) == 32000
    return tokenizer


@pytest.fixture(scope="session")
def llama_spm_model_file(tmp_path_factory) -> Path:
    """LLaMA's ``tokenizer.model``, rebuilt once per session from llama.cpp's GGUF vocabulary."""
    return _llama_spm_model(tmp_path_factory.mktemp("llama_spm"))


@pytest.fixture(scope="session", params=SENTENCEPIECE_VOCABULARIES)
def sentencepiece_model_file(request) -> Path:
    """A real 32,000-piece SentencePiece ``tokenizer.model``: Mistral's v1 file, then LLaMA's own."""
    if request.param == "mistral_v1":
        return _mistral_v1_model()
    return request.getfixturevalue("llama_spm_model_file")


@pytest.fixture(scope="session", params=[True, False], ids=["legacy", "nonlegacy"])
def golden_tokenizer(request, sentencepiece_model_file, tmp_path_factory):
    """``LlamaTokenizer`` (transformers' fast one) on ``sentencepiece_model_file``, legacy and non-legacy."""
    return _load_llama_tokenizer(sentencepiece_model_file, tmp_path_factory.mktemp("golden_tok"), request.param)


@pytest.fixture(scope="session", params=[True, False], ids=["legacy", "nonlegacy"])
def llama_tokenizer(request, tmp_path_factory):
    """``LlamaTokenizer`` (fast) on mistral-common's 32k LLaMA-style model, in legacy and non-legacy mode."""
    return _load_llama_tokenizer(_mistral_v1_model(), tmp_path_factory.mktemp("llama_tok"), request.param)
