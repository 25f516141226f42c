"""Tests for the NT-Xent loss: naive loop reference, gradients, bf16 autocast and a real 2-process run."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl_monai.losses import NTXentLoss, contrastive_top1, ntxent_loss

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def naive_ntxent(z1, z2, temperature, groups=None, mode="mask"):
    """Loop-per-anchor reference written straight from the SimCLR / SupCon definitions."""
    n = z1.shape[0]
    views = [z1[i] / z1[i].norm() for i in range(n)] + [z2[i] / z2[i].norm() for i in range(n)]
    total = 0.0
    for i in range(2 * n):
        partner = i + n if i < n else i - n

        def same_group_other(j, i=i):
            return groups is not None and j % n != i % n and groups[j % n] == groups[i % n]

        sim = {j: torch.dot(views[i], views[j]) / temperature for j in range(2 * n) if j != i}
        if groups is None or mode == "mask":
            denom = sum(torch.exp(s) for j, s in sim.items() if not same_group_other(j))
            total = total - (sim[partner] - torch.log(denom))
        else:
            denom = sum(torch.exp(s) for s in sim.values())
            positives = [partner] + [j for j in sim if same_group_other(j)]
            total = total - sum(sim[p] - torch.log(denom) for p in positives) / len(positives)
    return total / (2 * n)


def naive_top1(z1, z2, groups=None, mode="mask"):
    n = z1.shape[0]
    views = [z1[i] / z1[i].norm() for i in range(n)] + [z2[i] / z2[i].norm() for i in range(n)]
    hits = 0
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        best, best_j = -math.inf, None
        for j in range(2 * n):
            same = groups is not None and j % n != i % n and groups[j % n] == groups[i % n]
            if j == i or (same and mode == "mask"):
                continue
            s = float(torch.dot(views[i], views[j]))
            if s > best:
                best, best_j = s, j
        same_best = groups is not None and best_j % n != i % n and groups[best_j % n] == groups[i % n]
        hits += best_j == partner or (mode == "positive" and same_best)
    return hits / (2 * n)


GROUPS = [0, 1, 0, 2, 1, 3, 0]  # 7 items; group 0 has three items, group 1 two


@pytest.mark.parametrize("groups,mode", [(None, "mask"), (GROUPS, "mask"), (GROUPS, "positive")])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_naive_reference(groups, mode, temperature):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3.0
    z2 = z1 + torch.randn(7, 5, generator=g, dtype=torch.float64)
    gid = None if groups is None else torch.tensor(groups)
    loss_fn = NTXentLoss(temperature=temperature, same_group=mode)

    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, acc = loss_fn(a1, a2, gid, return_accuracy=True)
    loss.backward()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = naive_ntxent(b1, b2, temperature, groups, mode)
    ref.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a1.grad, b1.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(a2.grad, b2.grad, rtol=1e-8, atol=1e-12)
    assert acc.item() == pytest.approx(naive_top1(z1, z2, groups, mode))


def test_group_modes_differ_from_plain_and_each_other():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    plain = ntxent_loss(z1, z2)
    masked = ntxent_loss(z1, z2, group_ids=torch.tensor(GROUPS), same_group="mask")
    positive = ntxent_loss(z1, z2, group_ids=torch.tensor(GROUPS), same_group="positive")
    assert len({round(v.item(), 5) for v in (plain, masked, positive)}) == 3
    # All-distinct groups are the plain loss in both modes.
    distinct = torch.arange(7)
    torch.testing.assert_close(ntxent_loss(z1, z2, group_ids=distinct), plain)
    torch.testing.assert_close(ntxent_loss(z1, z2, group_ids=distinct, same_group="positive"), plain)


def test_string_group_ids_equal_integer_ids():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    names = [f"patient-{i}" for i in GROUPS]
    for mode in ("mask", "positive"):
        torch.testing.assert_close(
            ntxent_loss(z1, z2, group_ids=names, same_group=mode),
            ntxent_loss(z1, z2, group_ids=torch.tensor(GROUPS), same_group=mode),
        )


def test_temperature_closed_form():
    # Two items, both views identical, items orthogonal: each anchor sees its positive at cosine 1
    # and two negatives at cosine 0, so loss = log(1 + 2 exp(-1/t)) for every anchor.
    z = torch.eye(2, 3, dtype=torch.float64) * torch.tensor([[2.0], [5.0]], dtype=torch.float64)
    for t in (0.05, 0.1, 0.5, 1.0, 2.0):
        expected = math.log(1.0 + 2.0 * math.exp(-1.0 / t))
        assert NTXentLoss(temperature=t)(z, z.clone()).item() == pytest.approx(expected, rel=1e-12)
    # Lower temperature sharpens: aligned pairs get a smaller loss.
    assert NTXentLoss(temperature=0.1)(z, z).item() < NTXentLoss(temperature=1.0)(z, z).item()


def test_numerically_stable_at_low_temperature_in_float32():
    # t = 0.005 gives logits up to 200: exp() overflows float32, logsumexp must not.
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(6, 4, generator=g)
    z2 = z1 + 0.1 * torch.randn(6, 4, generator=g)
    loss = NTXentLoss(temperature=0.005)(z1, z2)
    assert torch.isfinite(loss)
    ref = naive_ntxent(z1.double(), z2.double(), 0.005)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-3)


def test_top1_accuracy_and_group_mask_effect():
    # Item 1 is a near copy of item 0 and closer to item 0's first view than item 0's own second view.
    z1 = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.05, 0.0], [0.0, 0.0, 1.0]])
    z2 = torch.tensor([[0.8, 0.6, 0.0], [0.8, 0.6, 0.05], [0.0, 0.1, 1.0]])
    acc_plain = contrastive_top1(z1, z2)
    acc_masked = contrastive_top1(z1, z2, group_ids=torch.tensor([7, 7, 8]))
    assert acc_plain.item() == pytest.approx(naive_top1(z1, z2))
    assert acc_plain.item() < 1.0
    assert acc_masked.item() == 1.0
    assert contrastive_top1(z1, z2, group_ids=torch.tensor([7, 7, 8]), same_group="positive").item() == 1.0
    # Same value as returned by the loss, and the accuracy carries no graph.
    _, acc = NTXentLoss()(z1.requires_grad_(), z2, return_accuracy=True)
    assert acc.item() == pytest.approx(acc_plain.item()) and not acc.requires_grad


@pytest.mark.parametrize("groups,mode", [(None, "mask"), ([0, 1, 0], "mask"), ([0, 1, 0], "positive")])
def test_gradcheck(groups, mode):
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gid = None if groups is None else torch.tensor(groups)
    loss_fn = NTXentLoss(temperature=0.3, same_group=mode)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b, gid), (z1, z2))


def test_bf16_autocast_and_inputs_use_float32_logits():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    loss_fn = NTXentLoss(temperature=0.1)
    ref = loss_fn(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(z1, z2)
        bf16_inputs = loss_fn(z1.bfloat16(), z2.bfloat16())
    assert under_autocast.dtype == torch.float32 and bf16_inputs.dtype == torch.float32
    # A bf16 similarity matmul would be off by ~1e-2 here.
    torch.testing.assert_close(under_autocast, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bf16_inputs, loss_fn(z1.bfloat16().float(), z2.bfloat16().float()))
    a = z1.bfloat16().requires_grad_()
    loss_fn(a, z2).backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()


def test_input_validation():
    with pytest.raises(ValueError):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ntxent_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=-0.1)
    with pytest.raises(ValueError):
        NTXentLoss(same_group="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError):
        NTXentLoss()(torch.randn(4, 3), torch.randn(4, 3), group_ids=torch.arange(3))


def _load_worker():
    spec = importlib.util.spec_from_file_location("_dist_ntxent_worker", HERE / "_dist_ntxent_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _single_process(worker, name):
    """Reference: one process, the whole concatenated batch."""
    _, groups, mode, ddp = worker.SCENARIOS[name]
    batch = worker.make_batch(name)
    gid = None if groups is None else (torch.tensor(groups) if isinstance(groups[0], int) else groups)
    loss_fn = NTXentLoss(temperature=0.2, same_group=mode)
    if ddp:
        model = worker.make_model(batch)
        loss, acc = loss_fn(model(batch["x1"]), model(batch["x2"]), gid, return_accuracy=True)
        loss.backward()
        return {
            "loss": loss.detach(),
            "acc": acc,
            "weight_grad": model.weight.grad,
            "bias_grad": model.bias.grad,
        }
    z1, z2 = batch["z1"].clone().requires_grad_(), batch["z2"].clone().requires_grad_()
    loss, acc = loss_fn(z1, z2, gid, return_accuracy=True)
    loss.backward()
    return {"loss": loss.detach(), "acc": acc, "z1_grad": z1.grad, "z2_grad": z2.grad}


def test_two_process_gloo_matches_single_process(tmp_path):
    """2 ranks with gloo: AVG of the rank losses == single-process loss on the concatenated batch;
    each rank's input grads == world_size x its rows of the single-process grad; DDP-averaged
    parameter grads == single-process parameter grads (with groups spanning ranks, unequal sizes)."""
    world = 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    # gloo otherwise binds to the hostname's interface, which some sandboxes lack.
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init_file = tmp_path / "init"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_dist_ntxent_worker.py"),
                str(r),
                str(world),
                str(init_file),
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"

    worker = _load_worker()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert set(results[0]) == set(worker.SCENARIOS)
    for name, (sizes, _, _, ddp) in worker.SCENARIOS.items():
        ref = _single_process(worker, name)
        per_rank = [res[name] for res in results]
        for r, out in enumerate(per_rank):
            msg = f"{name}, rank {r}"
            torch.testing.assert_close(out["loss_avg"], ref["loss"], rtol=1e-10, atol=1e-12, msg=msg)
            if ddp:
                torch.testing.assert_close(
                    out["weight_grad"], ref["weight_grad"], rtol=1e-9, atol=1e-12, msg=msg
                )
                torch.testing.assert_close(out["bias_grad"], ref["bias_grad"], rtol=1e-9, atol=1e-12, msg=msg)
            else:
                lo, hi = out["rows"]
                assert hi - lo == sizes[r]
                torch.testing.assert_close(
                    out["z1_grad"], world * ref["z1_grad"][lo:hi], rtol=1e-9, atol=1e-12, msg=msg
                )
                torch.testing.assert_close(
                    out["z2_grad"], world * ref["z2_grad"][lo:hi], rtol=1e-9, atol=1e-12, msg=msg
                )
        # Local accuracies weighted by local batch sizes give the global one.
        acc = sum(out["acc"] * n for out, n in zip(per_rank, sizes)) / sum(sizes)
        assert acc.item() == pytest.approx(ref["acc"].item())
        if not ddp:
            # Cross-rank negatives were used: a rank's loss is not the loss of its own rows alone.
            batch = worker.make_batch(name)
            lo, hi = per_rank[0]["rows"]
            alone = NTXentLoss(temperature=0.2)(batch["z1"][lo:hi], batch["z2"][lo:hi])
            assert abs(per_rank[0]["loss"].item() - alone.item()) > 1e-3
