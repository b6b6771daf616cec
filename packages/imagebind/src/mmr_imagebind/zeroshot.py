"""Zero-shot classification, cross-modal retrieval and embedding arithmetic on ImageBind embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mmr_core.utils import progress

from .model import ImageBind

DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "the sound of a {}.", "a picture of a {}.")


@torch.no_grad()
def text_classifier(
    model: ImageBind,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
) -> torch.Tensor:
    """One unit-norm text embedding per class: the mean over prompt templates, renormalised.

    Returns:
        ``(num_classes, out_embed_dim)``.
    """
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' for the class name: {bad}")
    device = next(model.parameters()).device
    rows = []
    for name in progress(classnames, desc="class prompts"):
        prompts = [t.format(name) for t in templates]
        embs = torch.cat(
            [
                model.encode("text", tokenizer(prompts[i : i + batch_size]).to(device))
                for i in range(0, len(prompts), batch_size)
            ]
        )
        rows.append(F.normalize(F.normalize(embs, dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


def zero_shot_logits(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(N, num_classes)`` between samples and class embeddings, in float32 on the
    samples' device (the classifier may come from a bf16 or GPU model, the samples from ``embed``)."""
    classifier = classifier.to(embeddings.device, torch.float32)
    return F.normalize(embeddings.float(), dim=-1) @ F.normalize(classifier, dim=-1).T


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions but {labels.shape[0]} labels")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Multi-label mAP (AudioSet style): average precision per class, averaged over classes with positives.

    Args:
        scores: ``(N, C)`` scores.
        targets: ``(N, C)`` 0/1 labels.
    """
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape")
    aps = []
    for c in range(scores.shape[1]):
        t = targets[:, c].bool()
        if not t.any():
            continue
        order = scores[:, c].argsort(descending=True)
        hits = t[order].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append((precision * hits).sum() / hits.sum())
    if not aps:
        raise ValueError("no class has a positive sample")
    return torch.stack(aps).mean().item()


def retrieval_recall(
    queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k of cross-modal retrieval.

    Args:
        queries: ``(Q, D)`` query embeddings.
        gallery: ``(G, D)`` gallery embeddings.
        targets: ``(Q,)`` index of each query's match in the gallery.

    Returns:
        ``{"R@1": ..., "R@5": ..., "R@10": ...}``.
    """
    sims = zero_shot_logits(queries, gallery)
    # Rank of the true match: how many gallery items score strictly higher.
    true = sims.gather(1, targets[:, None])
    rank = (sims > true).sum(dim=1)
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


def combine_embeddings(*embeddings: torch.Tensor) -> torch.Tensor:
    """Embedding arithmetic (e.g. image + audio): the sum of unit-normalised embeddings, renormalised."""
    return F.normalize(sum(F.normalize(e, dim=-1) for e in embeddings), dim=-1)
