"""Contrastive losses. The loss owns its distributed gather (as in open_clip).

``ContrastiveLoss`` is the symmetric InfoNCE of CLIP and ImageBind:

    L = 1/2 [ CE(s * a @ b.T, y) + CE(s * b @ a.T, y) ],   s = 1 / temperature

In a multi-process run each rank holds a slice of the batch. The embeddings are all-gathered *with
gradient* so that every sample meets every other one as a negative. Two ways to compute the loss:

* ``local_loss=False``: every rank builds the full (N x N) logits and computes the global loss.
* ``local_loss=True``: every rank builds only its own rows (B x N) and computes its share; the mean
  over ranks is the global loss. Less memory and compute (O(B N) instead of O(N^2)).

Both give, after the gradient averaging that DDP or DeepSpeed performs, exactly the gradient of the
single-process loss on the concatenated batch (tested with two gloo processes).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own slice.

    Every rank's loss depends on every gathered slice, so the gradient of rank r's features is the sum
    over ranks of the gradient each one computed for slice r: an all-reduce, then the local slice. (Our
    own function because ``torch.distributed.nn`` is deprecated; all-reduce also works on gloo, which
    has no reduce-scatter.)
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        rank, world = _distributed()
        ctx.rank, ctx.local = rank, features.shape[0]
        gathered = [torch.empty_like(features) for _ in range(world)]
        dist.all_gather(gathered, features.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.local:(ctx.rank + 1) * ctx.local]


def gather_features(features: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate a tensor from all ranks along dim 0.

    Args:
        features: Local tensor of shape (B, ...); every rank must pass the same shape.
        with_grad: Gather through autograd (gradients flow back to the owning rank). Without it the
            local slice is re-inserted so gradients still reach the local features, but only through
            the terms this rank computes.

    Returns:
        Tensor of shape (world_size * B, ...) ordered by rank.
    """
    rank, world = _distributed()
    if world == 1:
        return features
    if with_grad:
        return _AllGatherWithGrad.apply(features)
    gathered = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(gathered, features.detach())
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


class LogitScale(nn.Module):
    """Learnable inverse temperature stored as a log, clamped as CLIP does (scale <= ``max_scale``).

    Args:
        init_temperature: Initial temperature (CLIP: 0.07).
        max_scale: Upper bound of exp(log_scale); CLIP uses 100.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between two batches of embeddings, distributed-aware.

    Args:
        temperature: Fixed temperature (ImageBind uses 0.05-0.2 per modality), or the initial value
            when ``learnable`` is set.
        learnable: Learn the temperature (``LogitScale``) instead of keeping it fixed.
        max_scale: Clamp of the learnable scale (CLIP: 100).
        gather: All-gather embeddings across ranks (the usual choice).
        gather_with_grad: Gather through autograd; needed for the exact global gradient.
        local_loss: Compute only this rank's rows of the logits (see module docstring).
        normalize: L2-normalise the inputs first (set False when the model already does).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable: bool = False,
        max_scale: float = 100.0,
        gather: bool = True,
        gather_with_grad: bool = True,
        local_loss: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.logit_scale = LogitScale(temperature, max_scale) if learnable else None
        self.fixed_scale = 1.0 / temperature
        self.gather = gather
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self.normalize = normalize

    def scale(self) -> torch.Tensor | float:
        return self.logit_scale() if self.logit_scale is not None else self.fixed_scale

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Loss for paired rows of ``a`` and ``b`` (both (B, D)); row i of ``a`` matches row i of ``b``.

        Args:
            a: Embeddings of the first modality on this rank.
            b: Embeddings of the second modality on this rank.
            logit_scale: Override of the scale (e.g. a model-owned learnable scale).

        Returns:
            Scalar loss: the global loss, or with ``local_loss`` this rank's share (mean over ranks = global).
        """
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"expected two (B, D) tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        scale = self.scale() if logit_scale is None else logit_scale
        rank, world = _distributed()
        batch = a.shape[0]
        if world == 1 or not self.gather:
            logits = scale * a @ b.T
            labels = torch.arange(batch, device=a.device)
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        all_a = gather_features(a, self.gather_with_grad)
        all_b = gather_features(b, self.gather_with_grad)
        if self.local_loss:
            labels = torch.arange(batch, device=a.device) + rank * batch
            loss_ab = F.cross_entropy(scale * a @ all_b.T, labels)
            loss_ba = F.cross_entropy(scale * b @ all_a.T, labels)
            return 0.5 * (loss_ab + loss_ba)
        logits = scale * all_a @ all_b.T
        labels = torch.arange(all_a.shape[0], device=a.device)
        # Every rank computes the same global loss. all_gather's backward sums the gradients of all
        # W ranks, so local features receive W x dL/dx; the 1/W average of DDP/DeepSpeed undoes it.
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
