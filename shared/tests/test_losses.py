"""Contrastive loss: single-process maths and the 2-process gloo equivalence to one big batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmr_core.losses import ContrastiveLoss, LogitScale


def reference_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The InfoNCE of the ImageBind paper written out per row, both directions averaged."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    sim = a @ b.T / temperature
    rows = [-(sim[i, i] - torch.logsumexp(sim[i], 0)) for i in range(len(a))]
    cols = [-(sim[i, i] - torch.logsumexp(sim[:, i], 0)) for i in range(len(a))]
    return 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean())


def test_matches_the_written_out_formula() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    loss = ContrastiveLoss(temperature=0.05)(a, b)
    torch.testing.assert_close(loss, reference_info_nce(a, b, 0.05))


def test_perfectly_aligned_pairs_give_low_loss_and_shuffled_pairs_high() -> None:
    torch.manual_seed(0)
    a = F.normalize(torch.randn(16, 32), dim=-1)
    loss_fn = ContrastiveLoss(temperature=0.05)
    aligned = loss_fn(a, a)
    shuffled = loss_fn(a, a[torch.randperm(16)])
    assert aligned < 0.05
    assert shuffled > math.log(16) / 2


def test_learnable_scale_is_clamped_and_trains() -> None:
    scale = LogitScale(init_temperature=0.07, max_scale=100.0)
    torch.testing.assert_close(scale(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    torch.testing.assert_close(scale(), torch.tensor(100.0))
    loss_fn = ContrastiveLoss(temperature=0.07, learnable=True)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    loss_fn(a, b).backward()
    assert loss_fn.logit_scale.log_scale.grad is not None


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        ContrastiveLoss()(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, local_loss: bool, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        inputs_a, inputs_b = torch.randn(world * 4, 10), torch.randn(world * 4, 10)
        proj_a, proj_b = torch.nn.Linear(10, 6), torch.nn.Linear(10, 6)
        shard = slice(rank * 4, (rank + 1) * 4)
        loss_fn = ContrastiveLoss(temperature=0.1, local_loss=local_loss)
        loss = loss_fn(proj_a(inputs_a[shard]), proj_b(inputs_b[shard]))
        loss.backward()
        # What DDP / DeepSpeed do after backward: average the parameter gradients over ranks.
        grads = [p.grad for p in (*proj_a.parameters(), *proj_b.parameters())]
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss /= world
        if rank == 0:
            torch.save((global_loss, [g.clone() for g in grads]), result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("local_loss", [False, True], ids=["global-logits", "local-loss"])
def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(local_loss: bool, tmp_path) -> None:
    world = 2
    result_path = str(tmp_path / "rank0.pt")
    mp.start_processes(
        _worker, args=(world, _free_port(), local_loss, result_path), nprocs=world, join=True, start_method="spawn"
    )
    dist_loss, dist_grads = torch.load(result_path)

    torch.manual_seed(0)
    inputs_a, inputs_b = torch.randn(world * 4, 10), torch.randn(world * 4, 10)
    proj_a, proj_b = torch.nn.Linear(10, 6), torch.nn.Linear(10, 6)
    loss = ContrastiveLoss(temperature=0.1)(proj_a(inputs_a), proj_b(inputs_b))
    loss.backward()
    torch.testing.assert_close(dist_loss, loss.detach())
    for got, expected in zip(dist_grads, [p.grad for p in (*proj_a.parameters(), *proj_b.parameters())]):
        torch.testing.assert_close(got, expected)
