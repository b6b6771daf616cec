"""Tiny resumable DeepSpeed training run (on ``ResumableRun``), launched by the tests through ``deepspeed``.

A small MLP with dropout regresses synthetic data; inputs get python- and numpy-random augmentation,
so an exactly reproduced resume needs the data position and all three RNG streams restored. Each rank
writes ``<out>/rank<r>.json`` with its losses and what it resumed from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

NUM_SAMPLES = 64
IN_DIM = 8


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(NUM_SAMPLES, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, generator=g)
    return x, x @ w / IN_DIM**0.5 + 0.5


def rng_fingerprint() -> list[float]:
    """Next draw of each RNG stream, without advancing any of them."""
    py = random.Random()
    py.setstate(random.getstate())
    npr = np.random.RandomState()
    npr.set_state(np.random.get_state())
    g = torch.Generator()
    g.set_state(torch.get_rng_state())
    return [py.random(), float(npr.rand()), float(torch.rand(1, generator=g))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.add_argument("--preset", default="cpu_zero2")
    parser.add_argument("--total-steps", type=int, default=16)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--preempt-at-step", type=int, default=0, help="rank 1 asks for a stop at this step")
    parser.add_argument(
        "--preempt-with", choices=("signal", "file"), default="signal",
        help="how rank 1 asks: SIGUSR1 to itself, or creating $MMR_PREEMPT_FILE",
    )  # fmt: skip
    parser.add_argument("--kill-at-step", type=int, default=0, help="rank 1 SIGKILLs itself after this step")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()

    import deepspeed

    from mmr_core.distributed import ResumableRun, init_distributed, preset
    from mmr_core.utils import seed_everything

    t0 = time.perf_counter()
    env = init_distributed()
    torch.manual_seed(0)  # identical initial weights on every rank
    model = TinyNet()
    seed_everything(42, rank=env.rank)
    micro_batch, accum = 4, 2
    config = preset(args.preset, micro_batch_size=micro_batch, grad_accum=accum, persistence_threshold=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    report: dict = {
        "rank": env.rank,
        "world_size": env.world_size,
        "backend": env.backend,
        "omp_threads": torch.get_num_threads(),
        "losses": {},
        "preempted": False,
        "pid": os.getpid(),
    }
    data_state = {"epoch": 0, "micro_step": 0, "samples_seen": 0}
    # SIGTERM / SIGUSR1 / $MMR_PREEMPT_FILE; periodic crash-safe saves; the final save in finish().
    run = ResumableRun(engine, args.ckpt_dir, save_every=args.save_every, keep_last=args.keep_last)
    resumed = run.resume()
    if resumed is not None:
        data_state = dict(resumed["data_state"])
        report["resumed"] = {**resumed, "rng": rng_fingerprint()}
    report["seconds_setup"] = time.perf_counter() - t0

    x_all, y_all = dataset()
    per_rank = NUM_SAMPLES // env.world_size
    micro_per_epoch = per_rank // micro_batch
    step = engine.global_steps
    accum_loss = 0.0
    while step < args.total_steps:
        perm = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(100 + data_state["epoch"]))
        shard = perm[env.rank :: env.world_size]
        idx = shard[data_state["micro_step"] * micro_batch : (data_state["micro_step"] + 1) * micro_batch]
        noise = torch.from_numpy(np.random.normal(0.0, 0.05, size=(len(idx), IN_DIM))).float()
        x = x_all[idx] * (1.0 + 0.1 * random.random()) + noise
        loss = nn.functional.mse_loss(engine(x), y_all[idx])
        engine.backward(loss)
        engine.step()
        accum_loss += loss.item() / accum
        data_state["micro_step"] += 1
        data_state["samples_seen"] += len(idx)
        if data_state["micro_step"] == micro_per_epoch:
            data_state["epoch"] += 1
            data_state["micro_step"] = 0
        if engine.global_steps == step:
            continue  # still accumulating
        step = engine.global_steps
        report["losses"][step] = accum_loss
        accum_loss = 0.0
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if args.preempt_at_step == step and env.rank == 1:
            if args.preempt_with == "signal":
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                Path(os.environ["MMR_PREEMPT_FILE"]).touch()
        if args.kill_at_step == step and env.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dying between checkpoints (no save in flight)
        if run.after_step(step, data_state):  # preempted: every rank has saved this step
            report.update(preempted=True, stopped_at=step, data_state=data_state, rng=rng_fingerprint())
            break
    report["seconds_total"] = time.perf_counter() - t0
    report["final_step"] = step
    report["final_data_state"] = data_state
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{env.rank}.json").write_text(json.dumps(report, indent=1))
    run.finish(step, data_state)  # saves the final step if not saved yet; exits 75 if preempted


if __name__ == "__main__":
    main()
