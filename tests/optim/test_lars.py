"""Tests for LARS (SimCLR TF update rule) and the warm-up/cosine schedule and lr scaling."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medssl_monai.optim import LARS, lars_param_groups, scale_lr, warmup_cosine, warmup_cosine_scheduler

LR, MOMENTUM, WD, ETA = 2.0, 0.9, 0.1, 1e-3


def tiny_model() -> torch.nn.Sequential:
    """Linear(2 -> 1) + BatchNorm1d(1) with known values: ||W|| = 5."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
        model[0].bias.fill_(0.5)
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(0.0)
    return model


def set_grads(model: torch.nn.Sequential, w_grad: list[float]) -> None:
    model[0].weight.grad = torch.tensor([w_grad], dtype=torch.float64)
    model[0].bias.grad = torch.tensor([0.2], dtype=torch.float64)
    model[1].weight.grad = torch.tensor([0.1], dtype=torch.float64)
    model[1].bias.grad = torch.tensor([-0.3], dtype=torch.float64)


def lars_for(model: torch.nn.Module, **kwargs) -> LARS:
    return LARS(lars_param_groups(model, weight_decay=WD), lr=LR, momentum=MOMENTUM, eta=ETA, **kwargs)


def test_param_groups_split_bias_and_norm():
    model = tiny_model()
    groups = lars_param_groups(model, weight_decay=WD)
    assert len(groups) == 2
    assert groups[0]["params"] == [model[0].weight]
    assert groups[0]["weight_decay"] == WD and groups[0]["layer_adaptation"] is True
    assert {id(p) for p in groups[1]["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["layer_adaptation"] is False
    # Without exclusion everything is adapted and decayed.
    (only,) = lars_param_groups(model, weight_decay=WD, exclude_bias_and_norm=False)
    assert len(only["params"]) == 4


def test_two_steps_match_hand_computed_update():
    model = tiny_model()
    opt = lars_for(model)

    # Step 1: g + wd*w = [0.3, 0.4] + 0.1*[3, 4] = [0.6, 0.8], norm 1; trust = 1e-3 * 5 / 1 = 0.005;
    # v = lr * trust * g = 2 * 0.005 * [0.6, 0.8] = [0.006, 0.008]; w = [2.994, 3.992].
    set_grads(model, [0.3, 0.4])
    opt.step()
    expected_w1 = torch.tensor([[2.994, 3.992]], dtype=torch.float64)
    torch.testing.assert_close(model[0].weight.detach(), expected_w1, rtol=0, atol=1e-12)
    # bias / BN: plain momentum SGD, no decay, no trust ratio: p -= lr * g.
    assert model[0].bias.item() == pytest.approx(0.5 - 2.0 * 0.2)
    assert model[1].weight.item() == pytest.approx(1.0 - 2.0 * 0.1)
    assert model[1].bias.item() == pytest.approx(0.0 + 2.0 * 0.3)

    # Step 2 with a different lr (as under a schedule): lr enters the buffer, old steps keep theirs.
    lr2 = 1.0
    for group in opt.param_groups:
        group["lr"] = lr2
    set_grads(model, [0.1, -0.2])
    opt.step()
    g = torch.tensor([[0.1, -0.2]], dtype=torch.float64) + WD * expected_w1
    trust = ETA * expected_w1.norm() / g.norm()
    v2 = MOMENTUM * torch.tensor([[0.006, 0.008]], dtype=torch.float64) + lr2 * trust * g
    torch.testing.assert_close(model[0].weight.detach(), expected_w1 - v2, rtol=0, atol=1e-12)
    # bias: v2 = 0.9 * (2 * 0.2) + 1 * 0.2 = 0.56 (torch.optim.SGD would give 0.9*0.2 + 0.2 = 0.38).
    assert model[0].bias.item() == pytest.approx(0.1 - 0.56)
    assert model[1].weight.item() == pytest.approx(0.8 - (0.9 * 0.2 + 0.1))
    assert model[1].bias.item() == pytest.approx(0.6 - (0.9 * -0.6 - 0.3))


def test_excluded_params_equal_torch_sgd_momentum_at_constant_lr():
    model, ref = tiny_model(), tiny_model()
    opt = lars_for(model)
    sgd = torch.optim.SGD([ref[0].bias, *ref[1].parameters()], lr=LR, momentum=MOMENTUM)
    for k in range(3):
        for m in (model, ref):
            set_grads(m, [0.3 * k, 0.1])
            m[0].bias.grad *= k + 1
        opt.step()
        sgd.step()
    for p, q in [
        (model[0].bias, ref[0].bias),
        (model[1].weight, ref[1].weight),
        (model[1].bias, ref[1].bias),
    ]:
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_exclude_flag_equals_param_groups():
    a, b = tiny_model(), tiny_model()
    opt_a = lars_for(a)
    opt_b = LARS(
        b.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA, exclude_bias_and_norm=True
    )
    for grads in ([0.3, 0.4], [0.1, -0.2]):
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_nesterov_first_step():
    model = tiny_model()
    opt = lars_for(model, nesterov=True)
    set_grads(model, [0.3, 0.4])
    opt.step()
    # update = m * v + scaled_lr * g with v = scaled_lr * g = [0.006, 0.008]: 1.9 * [0.006, 0.008].
    expected = torch.tensor([[3.0 - 1.9 * 0.006, 4.0 - 1.9 * 0.008]], dtype=torch.float64)
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=0, atol=1e-12)


def test_popular_momentum_two_steps():
    model = tiny_model()
    opt = lars_for(model, classic_momentum=False)
    set_grads(model, [0.3, 0.4])
    opt.step()
    # v = g + wd*w = [0.6, 0.8]; trust = 1e-3 * 5 / ||v|| = 0.005; w -= lr * trust * v.
    w1 = torch.tensor([[2.994, 3.992]], dtype=torch.float64)
    torch.testing.assert_close(model[0].weight.detach(), w1, rtol=0, atol=1e-12)
    set_grads(model, [0.1, -0.2])
    opt.step()
    v2 = MOMENTUM * torch.tensor([[0.6, 0.8]], dtype=torch.float64) + (
        torch.tensor([[0.1, -0.2]], dtype=torch.float64) + WD * w1
    )
    expected = w1 - LR * (ETA * w1.norm() / v2.norm()) * v2
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=0, atol=1e-12)


def test_trust_ratio_is_one_for_zero_weight_or_zero_grad():
    w = torch.nn.Parameter(torch.zeros(1, 2, dtype=torch.float64))
    opt = LARS([w], lr=0.5, momentum=MOMENTUM, weight_decay=WD, eta=ETA)
    w.grad = torch.tensor([[0.3, 0.4]], dtype=torch.float64)
    opt.step()  # ||w|| = 0 -> trust 1: w = -lr * g
    torch.testing.assert_close(w.detach(), torch.tensor([[-0.15, -0.2]], dtype=torch.float64))

    u = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = LARS([u], lr=0.5, momentum=MOMENTUM, weight_decay=0.0, eta=ETA)
    u.grad = torch.zeros(1, 2, dtype=torch.float64)
    opt.step()  # zero gradient: nothing moves, no nan
    torch.testing.assert_close(u.detach(), torch.tensor([[3.0, 4.0]], dtype=torch.float64))


def test_lars_trains_a_model_through_closure():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = LARS(lars_param_groups(model, 1e-6), lr=0.1, eta=1e-2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(30):
        opt.step(closure)
    assert closure().item() < 0.8 * first


# ---- schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),  # SimCLR: lr starts at 0
        (5, 0.5),  # half-way through warm-up
        (10, 1.0),  # end of warm-up = base lr
        (40, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3))),  # one third of the cosine = 0.775
        (55, 0.55),  # middle of the cosine: (base + final) / 2
        (100, 0.1),  # end
        (150, 0.1),  # past the end stays at final
    ],
)
def test_warmup_cosine_known_values(step, expected):
    assert warmup_cosine(step, total_steps=100, warmup_steps=10, base_lr=1.0, final_lr=0.1) == pytest.approx(
        expected
    )


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 10, 1.0) for s in range(101)]
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # increasing warm-up
    assert all(a > b for a, b in itertools.pairwise(lrs[10:]))  # decreasing cosine
    assert lrs[99] > 0.0 and lrs[100] == 0.0
    assert warmup_cosine(0, 100, 0, 2.0) == 2.0  # no warm-up
    with pytest.raises(ValueError):
        warmup_cosine(0, 100, 101, 1.0)


def test_lambda_scheduler_applies_per_group():
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = LARS([{"params": [params[0]], "lr": 2.0}, {"params": [params[1]], "lr": 0.5}], lr=1.0)
    sched = warmup_cosine_scheduler(opt, total_steps=20, warmup_steps=4, final_lr_ratio=0.01)
    for step in range(25):
        for group, base in zip(opt.param_groups, (2.0, 0.5)):
            assert group["lr"] == pytest.approx(warmup_cosine(step, 20, 4, base, 0.01 * base)), step
        opt.step()
        sched.step()


def test_scale_lr():
    assert scale_lr(0.3, 256) == pytest.approx(0.3)
    assert scale_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scale_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_lr(0.075, 256, "sqrt") == pytest.approx(1.2)
    assert scale_lr(0.3, 512) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        scale_lr(0.3, 256, "cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        scale_lr(0.3, 0)
