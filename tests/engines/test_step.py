"""The contrastive step equals a hand-written PyTorch step with the same model, loss and optimiser."""

from __future__ import annotations

import copy

import pytest
import torch

from medssl_monai.engines import ContrastiveStep
from medssl_monai.losses import NTXentLoss
from medssl_monai.networks import ProjectionHead, SSLModel, get_backbone
from medssl_monai.optim import LARS, lars_param_groups, warmup_cosine_scheduler


def _model() -> SSLModel:
    torch.manual_seed(0)
    bb = get_backbone("cbr_tiny", in_channels=3)
    return SSLModel(bb, ProjectionHead(bb.feature_dim, 64, 32))


def _batch(n: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"view_1": torch.rand(n, 3, 32, 32, generator=g), "view_2": torch.rand(n, 3, 32, 32, generator=g),
            "group_index": torch.tensor([0, 0, 1, 2, 3, 3][:n])}


def test_step_matches_bare_loop() -> None:
    ours, ref = _model(), _model()
    opt_a = LARS(lars_param_groups(ours, 1e-4), lr=0.5)
    opt_b = LARS(lars_param_groups(ref, 1e-4), lr=0.5)
    step = ContrastiveStep(ours, NTXentLoss(0.2), opt_a, warmup_cosine_scheduler(opt_a, 10, 2))
    sched_b = warmup_cosine_scheduler(opt_b, 10, 2)
    loss_fn = NTXentLoss(0.2)
    for _ in range(3):
        batch = _batch()
        out = step(batch)
        # the bare loop, written out
        ref.train()
        _, z = ref(torch.cat([batch["view_1"], batch["view_2"]]))
        z1, z2 = z.chunk(2)
        loss = loss_fn(z1, z2, group_ids=batch["group_index"])
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
        sched_b.step()
        assert torch.allclose(out["loss"], loss.detach(), atol=1e-6)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert float(out["lr"]) == pytest.approx(opt_b.param_groups[0]["lr"])


def test_groups_change_the_loss() -> None:
    model = _model()
    batch = _batch()
    step = ContrastiveStep(copy.deepcopy(model), NTXentLoss(0.2), torch.optim.SGD(model.parameters(), lr=0.0))
    with_groups = step(batch)["loss"]
    no_groups = ContrastiveStep(copy.deepcopy(model), NTXentLoss(0.2), torch.optim.SGD(model.parameters(), lr=0.0),
                                group_key=None)(batch)["loss"]
    assert not torch.allclose(with_groups, no_groups)


def test_grad_clip_and_bf16_channels_last() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = ContrastiveStep(model, NTXentLoss(), opt, grad_clip=1e-3, amp="bf16", channels_last=True)
    out = step(_batch())
    assert torch.isfinite(out["loss"])
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(total) <= 1e-3 * 1.01
    with pytest.raises(ValueError, match="amp"):
        ContrastiveStep(model, NTXentLoss(), opt, amp="fp8")
