"""Zero-shot and retrieval utilities on hand-made embeddings and a tiny model."""

from __future__ import annotations

import pytest
import torch

from mmr_imagebind.model import ImageBind, ImageBindConfig
from mmr_imagebind.zeroshot import (
    combine_embeddings,
    mean_average_precision,
    retrieval_recall,
    text_classifier,
    top_k_accuracy,
    zero_shot_logits,
)


def test_top_k_and_logits() -> None:
    classifier = torch.eye(3)
    emb = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.5, 0.6, 0.0]])
    logits = zero_shot_logits(emb, classifier)
    assert top_k_accuracy(logits, torch.tensor([0, 2, 0])) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, torch.tensor([0, 2, 0]), k=2) == 1.0


def test_map_against_hand_computed() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0]])
    # Class 0: positives at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2; class 1: positive at rank 1 -> AP = 1.
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    with pytest.raises(ValueError, match="differ"):
        mean_average_precision(scores, targets[:2])


def test_retrieval_recall() -> None:
    gallery = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0.9, 1.0, 0, 0], [0, 0, 0.1, 1.0], [0.0, 0.5, 0.4, 0.3]])
    r = retrieval_recall(queries, gallery, torch.tensor([0, 0, 2, 3]), ks=(1, 2, 3))
    # Ranks of the matches: 0, 1, 1, 2.
    assert r == pytest.approx({"R@1": 0.25, "R@2": 0.75, "R@3": 1.0})


def test_combine_embeddings_is_normalised_sum() -> None:
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    torch.testing.assert_close(combine_embeddings(a, b), torch.tensor([[2**-0.5, 2**-0.5]]))


def test_text_classifier_with_tiny_model() -> None:
    torch.manual_seed(0)
    model = ImageBind(ImageBindConfig.from_name("tiny"), modalities=["text"]).eval()

    def tokenizer(prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), 8, dtype=torch.long)
        for i, p in enumerate(prompts):
            body = [1 + (ord(c) % 60) for c in p][:6]
            ids[i, : len(body) + 1] = torch.tensor(body + [63])
        return ids

    cls = text_classifier(model, tokenizer, ["dog", "cat", "car"], templates=["a {}", "{} sound"])
    assert cls.shape == (3, 16)
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(cls[0], cls[1])
    with pytest.raises(ValueError, match="templates must contain"):
        text_classifier(model, tokenizer, ["dog"], templates=["no slot"])
