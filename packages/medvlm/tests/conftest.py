"""Shared fixtures: a tiny BERT WordPiece vocabulary written on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] . , ? the of is in a or and what color shape location these "
    "small colorless platelet rounded fresh ##color red blood cell irregular purple blue white "
    "thrombo ##cyte erythro leuko corpuscle large pink round circle square triangle green yellow "
    "top bottom left right center ##s dark light bright ring"
).split()


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer(vocab_file):
    from transformers import BertTokenizerFast

    # transformers 5 takes the WordPiece vocabulary as ``vocab`` (a path or a dict).
    return BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
