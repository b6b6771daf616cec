"""Shared fixtures: a real LLaMA SentencePiece tokenizer from the mistral-common wheel."""

import os
import shutil
from pathlib import Path

import pytest


def _llama_sp_model() -> Path | None:
    try:
        import mistral_common
    except ImportError:
        return None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


@pytest.fixture(scope="session", params=[True, False], ids=["legacy", "nonlegacy"])
def llama_tokenizer(request, tmp_path_factory):
    """LlamaTokenizer (fast) on the 32k LLaMA-style SentencePiece model, in legacy and non-legacy mode."""
    model = _llama_sp_model()
    if model is None:
        message = "mistral-common (LLaMA SentencePiece model) not installed: pip install -e './packages/llava[test]'"
        if os.environ.get("CI"):  # CI installs the test extra: a skip there would hide the golden tests
            pytest.fail(message)
        pytest.skip(message)
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("llama_tok")
    shutil.copy(model, folder / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(folder), legacy=request.param)
    assert tok.legacy is request.param and len(tok) == 32000
    return tok
