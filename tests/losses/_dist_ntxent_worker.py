"""One rank of the multi-process NT-Xent test (gloo on CPU), launched by ``tests/losses/test_ntxent.py``.

Usage: ``python _dist_ntxent_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR``. Every rank builds the same
global batches from fixed seeds, takes its rows, runs the distributed loss and saves what it saw to
``OUT_DIR/rank{RANK}.pt``; the test compares that with a single-process run on the whole batch.
This module is also imported by the test (for ``SCENARIOS`` and ``make_batch``), so it must not start
anything at import time.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import torch

DIM = 6
IN_DIM = 5

# name -> (per-rank sizes, global group ids or None, same_group mode, use a DDP-wrapped model)
SCENARIOS: dict[str, tuple[tuple[int, ...], list[Any] | None, str, bool]] = {
    "plain": ((4, 4), None, "mask", False),
    # groups span ranks: items 1 and 5 (rank 0 / rank 1), 2 and 7, and 0 and 3 within rank 0.
    "mask": ((4, 4), [0, 1, 2, 0, 3, 1, 3, 2], "mask", False),
    "positive": ((4, 4), [0, 1, 2, 0, 3, 1, 3, 2], "positive", False),
    "uneven_positive": ((3, 5), [0, 1, 2, 0, 3, 1, 3, 2], "positive", False),
    "uneven_mask_str": ((3, 5), ["p0", "p1", "p2", "p0", "p3", "p1", "p3", "p2"], "mask", False),
    "ddp_plain": ((4, 4), None, "mask", True),
    "ddp_uneven_mask": ((5, 3), [0, 1, 2, 0, 3, 1, 3, 2], "mask", True),
}


def make_batch(name: str) -> dict[str, Any]:
    """Deterministic global batch of a scenario (float64 for tight comparisons)."""
    sizes, groups, _, ddp = SCENARIOS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    n = sum(sizes)
    batch: dict[str, Any] = {"groups": groups}
    if ddp:
        batch["x1"] = torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
        batch["x2"] = batch["x1"] + 0.3 * torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
        batch["weight"] = torch.randn(DIM, IN_DIM, generator=g, dtype=torch.float64)
        batch["bias"] = torch.randn(DIM, generator=g, dtype=torch.float64)
    else:
        batch["z1"] = torch.randn(n, DIM, generator=g, dtype=torch.float64)
        batch["z2"] = batch["z1"] + 0.5 * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return batch


def make_model(batch: dict[str, Any]) -> torch.nn.Linear:
    model = torch.nn.Linear(IN_DIM, DIM).double()
    with torch.no_grad():
        model.weight.copy_(batch["weight"])
        model.bias.copy_(batch["bias"])
    return model


def run_rank(rank: int, world: int) -> dict[str, dict[str, Any]]:
    import torch.distributed as dist

    from medssl_monai.losses import NTXentLoss

    results: dict[str, dict[str, Any]] = {}
    for name, (sizes, groups, mode, ddp) in SCENARIOS.items():
        batch = make_batch(name)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        local_groups = None
        if groups is not None:
            local = groups[lo:hi]
            local_groups = torch.tensor(local) if isinstance(local[0], int) else local
        loss_fn = NTXentLoss(temperature=0.2, same_group=mode)
        out: dict[str, Any] = {}
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(make_model(batch))
            z1, z2 = model(batch["x1"][lo:hi]), model(batch["x2"][lo:hi])
            loss, acc = loss_fn(z1, z2, local_groups, return_accuracy=True)
            loss.backward()
            out["weight_grad"] = model.module.weight.grad.clone()
            out["bias_grad"] = model.module.bias.grad.clone()
        else:
            z1 = batch["z1"][lo:hi].clone().requires_grad_()
            z2 = batch["z2"][lo:hi].clone().requires_grad_()
            loss, acc = loss_fn(z1, z2, local_groups, return_accuracy=True)
            loss.backward()
            out["z1_grad"], out["z2_grad"] = z1.grad.clone(), z2.grad.clone()
        avg = loss.detach().clone()
        dist.all_reduce(avg, op=dist.ReduceOp.SUM)
        out.update(loss=loss.detach(), loss_avg=avg / world, acc=acc, rows=(lo, hi))
        results[name] = out
    return results


def main() -> None:
    import torch.distributed as dist

    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        torch.save(run_rank(rank, world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
