"""LARS optimiser following the reference SimCLR TensorFlow implementation.

For each parameter ``w`` with gradient ``g`` (defaults: ``classic_momentum=True``, no Nesterov)::

    g     = g + weight_decay * w                       # unless excluded from weight decay
    trust = eta * ||w|| / ||g||  if ||w|| > 0 and ||g|| > 0 else 1   # 1 if excluded from adaptation
    v     = momentum * v + lr * trust * g              # v starts at zero
    w     = w - v

The learning rate is applied *inside* the momentum buffer ("classic" momentum), unlike
``torch.optim.SGD`` (``v = m v + g; w -= lr v``). The two agree for a constant learning rate but not
under warm-up/cosine schedules, where the buffer here keeps the learning rates of past steps. With
``classic_momentum=False`` the TF "popular momentum" branch is used instead: ``v = m v + g`` and
``w -= lr * trust * v`` with the trust ratio computed from ``||v||``.

Following SimCLR, biases and normalisation parameters should get neither weight decay nor layer
adaptation (they then get plain momentum SGD); :func:`lars_param_groups` builds such groups, or pass
``exclude_bias_and_norm=True`` to treat every parameter with ``ndim <= 1`` that way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["LARS", "lars_param_groups"]


def lars_param_groups(
    model: torch.nn.Module, weight_decay: float, exclude_bias_and_norm: bool = True
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into LARS parameter groups.

    Parameters with ``ndim <= 1`` (biases and BatchNorm/GroupNorm/LayerNorm affine parameters) go into
    a group with ``weight_decay=0`` and ``layer_adaptation=False``, as in SimCLR, where decaying them or
    rescaling their step by their (tiny or unit) norm hurts. Frozen parameters are kept, so that
    unfreezing them later does not require rebuilding the optimiser. Empty groups are dropped.
    """
    adapted: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for p in model.parameters():
        (plain if exclude_bias_and_norm and p.ndim <= 1 else adapted).append(p)
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "layer_adaptation": True},
        {"params": plain, "weight_decay": 0.0, "layer_adaptation": False},
    ]
    return [g for g in groups if g["params"]]


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017) with SimCLR's update rule.

    Args:
        params: parameters or parameter groups; groups may set ``layer_adaptation`` (bool) and any of
            the arguments below.
        lr: learning rate (SimCLR: ``scale_lr(0.3, batch_size)``).
        momentum: momentum factor.
        weight_decay: L2 penalty added to the gradient before computing the trust ratio.
        eta: trust coefficient of the layer-wise ratio ``eta * ||w|| / ||g + wd * w||``.
        nesterov: Nesterov momentum, as in the TF implementation.
        classic_momentum: apply lr inside the momentum buffer (SimCLR default), see module docstring.
        exclude_bias_and_norm: treat every parameter with ``ndim <= 1`` as excluded from weight decay
            and adaptation, whatever its group says; convenient with ``model.parameters()``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        nesterov: bool = False,
        classic_momentum: bool = True,
        exclude_bias_and_norm: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if eta <= 0:
            raise ValueError(f"Invalid eta: {eta}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "nesterov": nesterov,
            "classic_momentum": classic_momentum,
            "layer_adaptation": True,
        }
        super().__init__(params, defaults)
        self.exclude_bias_and_norm = exclude_bias_and_norm

    @staticmethod
    def _trust_ratio(w: torch.Tensor, u: torch.Tensor, eta: float) -> torch.Tensor:
        # A tensor, not a Python float, so that no device synchronisation happens per parameter.
        w_norm, u_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(u)
        ok = (w_norm > 0) & (u_norm > 0)
        return torch.where(ok, eta * w_norm / torch.where(ok, u_norm, 1.0), 1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, eta = group["lr"], group["momentum"], group["eta"]
            nesterov, classic = group["nesterov"], group["classic_momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients.")
                excluded = self.exclude_bias_and_norm and p.ndim <= 1
                weight_decay = 0.0 if excluded else group["weight_decay"]
                adapt = group["layer_adaptation"] and not excluded

                grad = p.grad
                if weight_decay:
                    grad = grad.add(p, alpha=weight_decay)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]

                if classic:
                    scaled_lr = lr * self._trust_ratio(p, grad, eta) if adapt else lr
                    buf.mul_(momentum).add_(grad * scaled_lr)
                    update = buf * momentum + grad * scaled_lr if nesterov else buf
                    p.sub_(update)
                else:
                    buf.mul_(momentum).add_(grad)
                    update = buf * momentum + grad if nesterov else buf
                    scaled_lr = lr * self._trust_ratio(p, update, eta) if adapt else lr
                    p.sub_(update * scaled_lr)
        return loss
