"""Our CLIP BPE tokenizer gives the official SimpleTokenizer's ids (fixture made by make_parity_fixture.py)."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from mmr_imagebind.tokenizer import ENV_VAR, CLIPTokenizer, byte_symbols, find_bpe_vocab

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_parity.json").read_text())


@pytest.fixture()
def synthetic_vocab(tmp_path: Path) -> Path:
    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(FIXTURE["synthetic_merges"]) + "\n")
    return path


def test_matches_official_ids_on_synthetic_merges(synthetic_vocab: Path) -> None:
    tok = CLIPTokenizer(synthetic_vocab, context_length=FIXTURE["synthetic_context_length"])
    for text, expected in zip(FIXTURE["texts"], FIXTURE["synthetic_ids"], strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 100-word text is cut on purpose (official behaviour)
            assert tok(text).tolist() == expected, text
    batch = tok(FIXTURE["texts"][:2])
    assert batch.shape == (2, 16) and batch.tolist() == FIXTURE["synthetic_ids"][:2]


def test_truncation_keeps_end_of_text(synthetic_vocab: Path) -> None:
    tok = CLIPTokenizer(synthetic_vocab, context_length=16)
    with pytest.warns(UserWarning, match=r"1 of 1 texts are longer than the context of 16 tokens .* 102 tokens"):
        ids = tok("word " * 100)
    assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id and int(ids.argmax()) == 15
    short = tok("dog")
    assert int(short.argmax()) == int((short != 0).sum()) - 1  # the text head pools at argmax


def test_decode_roundtrip(synthetic_vocab: Path) -> None:
    tok = CLIPTokenizer(synthetic_vocab)
    assert tok.decode(tok.encode("A photo of the dog!")) == "a photo of the dog ! "
    assert len(set(byte_symbols().values())) == 256


def test_vocab_lookup_order_and_errors(monkeypatch, tmp_path: Path) -> None:
    import mmr_imagebind.tokenizer as T

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(T, "packaged_bpe_vocab", lambda: None)
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        find_bpe_vocab()
    # A given path that does not exist is an error naming it, not a silent fallback.
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        find_bpe_vocab(tmp_path / "nope.txt.gz")
    (tmp_path / "x.gz").write_bytes(b"")
    (tmp_path / "y.gz").write_bytes(b"")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "x.gz"))
    assert find_bpe_vocab() == tmp_path / "x.gz"
    assert find_bpe_vocab(tmp_path / "y.gz") == tmp_path / "y.gz"  # the argument wins over the variable
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.gz"))
    with pytest.raises(FileNotFoundError, match="gone.gz"):
        find_bpe_vocab()
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr(T, "packaged_bpe_vocab", lambda: tmp_path / "y.gz")
    assert find_bpe_vocab() == tmp_path / "y.gz"


@pytest.mark.skipif("real_ids" not in FIXTURE, reason="fixture made without the real vocabulary")
def test_matches_official_ids_on_real_vocabulary() -> None:
    try:
        path = find_bpe_vocab()
    except FileNotFoundError:
        pytest.skip(f"install open_clip_torch (the test extra) or set {ENV_VAR} to CLIP's vocabulary file")
    tok = CLIPTokenizer(path)
    assert (tok.sot_id, tok.eot_id) == (49406, 49407)
    for text, expected in zip(FIXTURE["texts"], FIXTURE["real_ids"], strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 100-word text is cut on purpose (official behaviour)
            assert tok(text).tolist() == expected, text
