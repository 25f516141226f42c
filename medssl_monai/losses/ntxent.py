"""NT-Xent (SimCLR) contrastive loss with cross-rank negatives and patient-aware masking.

Conventions
-----------
The ``2N`` views of a batch are ordered ``[z1; z2]``: view ``i < N`` is the first view of item ``i``
and view ``N + i`` its second view. Each view is an anchor whose positive is its partner view; every
other view except itself is a candidate in the softmax denominator. The loss is the mean over the
``2N`` anchors. (The reference TensorFlow SimCLR returns ``loss_a + loss_b``, i.e. twice this value,
so its raw gradients are twice ours; LARS's trust ratio largely cancels that for adapted layers.)

Distributed semantics
---------------------
When ``torch.distributed`` is initialised with world size ``W > 1`` (and ``gather_distributed=True``),
each rank gathers the normalised embeddings of all ranks (gradients flow back to the rank that owns
them) and computes the loss of its *own* anchors against the *global* candidate set. The global batch
is the concatenation of the ranks' batches in rank order. With ``N`` the global number of items, the
rank-local loss is ``sum(local anchor losses) / (2N / W)``, which is the local mean when all ranks have
the same batch size. Then, exactly (up to floating point):

* ``all_reduce(loss, AVG)`` equals the single-process loss on the concatenated batch;
* the gradient of rank ``r``'s local loss w.r.t. its inputs ``z1_r, z2_r``, *after* the gather's
  backward (which all-reduce-sums the contributions that every rank's loss makes to rank ``r``'s rows)
  equals ``W`` times the corresponding rows of the single-process gradient;
* hence, after DDP's gradient averaging (sum over ranks divided by ``W``), parameter gradients equal the
  single-process parameter gradients on the concatenated batch.

Every rank must call the loss and ``backward`` (both are collectives); for rank-0-only evaluation pass
``gather_distributed=False``. Per-rank batch sizes may differ (one extra tiny all-gather of the sizes
per call; it synchronises with the device). Group ids given as a sequence of hashables (e.g. patient id
strings) are exchanged with ``all_gather_object``; integer tensors are cheaper.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["NTXentLoss", "contrastive_top1", "ntxent_loss"]

GroupIds = torch.Tensor | Sequence[Hashable]
SameGroupMode = Literal["mask", "positive"]
_MODES = ("mask", "positive")


def _check_args(temperature: float, same_group: str) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if same_group not in _MODES:
        raise ValueError(f"same_group must be one of {_MODES}, got {same_group!r}.")


def _dist_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (sizes may differ per rank) whose backward returns each rank the sum,
    over all ranks, of the gradient w.r.t. its own rows (SimCLR's cross-replica concat, solo-learn's
    ``GatherLayer``). ``torch.distributed.nn.functional.all_gather`` does the same but is deprecated
    and does not handle unequal sizes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        max_n = max(sizes)
        x = x.contiguous()
        if x.shape[0] < max_n:
            x = torch.cat([x, x.new_zeros((max_n - x.shape[0], *x.shape[1:]))])
        out = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(out, x)
        ctx.sizes = sizes
        ctx.start = sum(sizes[:rank])
        ctx.n = sizes[rank]
        return torch.cat([o[:s] for o, s in zip(out, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n], None


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


def _gather_no_grad(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return _GatherWithGrad.apply(x.detach(), sizes)


def _ids_to_tensor(ids: Sequence[Hashable], device: torch.device) -> torch.Tensor:
    """Map arbitrary hashable ids (e.g. patient id strings) to consecutive integers."""
    codes: dict[Hashable, int] = {}
    return torch.tensor([codes.setdefault(i, len(codes)) for i in ids], dtype=torch.long, device=device)


def _prepare_groups(
    group_ids: GroupIds, n: int, device: torch.device, sizes: list[int] | None
) -> torch.Tensor:
    """Return the group id of every item of the (global) batch as a 1-D tensor."""
    if isinstance(group_ids, torch.Tensor):
        g = group_ids.to(device).reshape(-1)
        if g.numel() != n:
            raise ValueError(f"group_ids has {g.numel()} entries, expected {n} (one per item).")
        if not torch.is_floating_point(g):
            g = g.long()
        return g if sizes is None else _gather_no_grad(g, sizes)
    ids = list(group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} entries, expected {n} (one per item).")
    if sizes is not None:
        gathered: list[list[Hashable] | None] = [None] * len(sizes)
        dist.all_gather_object(gathered, ids)
        ids = [i for part in gathered for i in (part or [])]
    return _ids_to_tensor(ids, device)


def _ntxent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    group_ids: GroupIds | None,
    same_group: str,
    gather_distributed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared implementation; returns ``(loss, top1_accuracy)`` for this rank's anchors."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both be (N, D) with equal shapes, got {tuple(z1.shape)}, {tuple(z2.shape)}."
        )
    _check_args(temperature, same_group)
    n, device = z1.shape[0], z1.device
    # Low-precision inputs are upcast; double stays double (gradcheck).
    dtype = torch.promote_types(z1.dtype, torch.float32)
    world = _dist_world_size() if gather_distributed else 1

    # Autocast would run the similarity matmul in bf16/fp16 again; the logits need float32.
    with torch.autocast(device_type=device.type, enabled=False):
        a1 = F.normalize(z1.to(dtype), dim=1)
        a2 = F.normalize(z2.to(dtype), dim=1)
        if world > 1:
            sizes = _gather_sizes(n, device)
            offset = sum(sizes[: dist.get_rank()])
            # One collective for both views: (n, 2D) -> (N, 2D).
            both = _GatherWithGrad.apply(torch.cat([a1, a2], dim=1), sizes)
            c1, c2 = both.split(a1.shape[1], dim=1)
        else:
            sizes, offset, c1, c2 = None, 0, a1, a2
        n_global = c1.shape[0]
        anchors = torch.cat([a1, a2])  # (2n, D)
        candidates = torch.cat([c1, c2])  # (2N, D)
        local = torch.arange(n, device=device) + offset
        anchor_idx = torch.cat([local, local + n_global])  # global view index of each anchor
        pos_idx = (anchor_idx + n_global) % (2 * n_global)
        rows = torch.arange(2 * n, device=device)

        logits = anchors @ candidates.T / temperature  # (2n, 2N)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, anchor_idx] = True
        pos_mask = torch.zeros_like(self_mask)
        pos_mask[rows, pos_idx] = True

        same_other = None
        if group_ids is not None:
            groups = _prepare_groups(group_ids, n, device, sizes)  # (N,)
            cand_item = torch.arange(2 * n_global, device=device) % n_global
            anchor_item = anchor_idx % n_global
            same_other = (groups[anchor_item][:, None] == groups[cand_item][None, :]) & (
                anchor_item[:, None] != cand_item[None, :]
            )

        logits = logits.masked_fill(self_mask, float("-inf"))
        if same_other is not None and same_group == "mask":
            logits = logits.masked_fill(same_other, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)

        if same_other is not None and same_group == "positive":
            pos_mask = pos_mask | same_other
            # torch.where, not multiplication: log_prob is -inf on the diagonal and -inf * 0 = nan.
            per_anchor = -torch.where(pos_mask, log_prob, 0.0).sum(1) / pos_mask.sum(1)
        else:
            per_anchor = -log_prob[rows, pos_idx]

        # sum / (2N / W): the local mean for equal per-rank sizes; makes the AVG all-reduce exact otherwise.
        loss = per_anchor.sum() * world / (2 * n_global)

        with torch.no_grad():
            top = logits.argmax(dim=1)
            acc = pos_mask[rows, top].to(dtype).mean() if n > 0 else logits.new_zeros(())
    return loss, acc


def ntxent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    group_ids: GroupIds | None = None,
    same_group: SameGroupMode = "mask",
    gather_distributed: bool = True,
) -> torch.Tensor:
    """Functional form of :class:`NTXentLoss`."""
    return _ntxent(z1, z2, temperature, group_ids, same_group, gather_distributed)[0]


@torch.no_grad()
def contrastive_top1(
    z1: torch.Tensor,
    z2: torch.Tensor,
    group_ids: GroupIds | None = None,
    same_group: SameGroupMode = "mask",
    gather_distributed: bool = True,
) -> torch.Tensor:
    """Fraction of this rank's anchors whose most similar candidate is a positive.

    Candidates are the ones of the loss's denominator (self excluded; same-group views excluded in
    ``"mask"`` mode). In ``"positive"`` mode any same-group view counts as a hit. Under distributed
    training this is the local value over global candidates; average it across ranks for logging.
    """
    return _ntxent(z1, z2, 1.0, group_ids, same_group, gather_distributed)[1]


class NTXentLoss(torch.nn.Module):
    """SimCLR's normalised temperature-scaled cross-entropy (NT-Xent).

    Args:
        temperature: softmax temperature on cosine similarities (SimCLR uses 0.1 for large batches).
        same_group: what to do with views of *other* items that share the anchor's ``group_ids``
            (e.g. two images of the same patient, MICLe): ``"mask"`` drops them from the denominator
            so they are not pushed apart; ``"positive"`` treats them as extra positives and averages
            the log-likelihood over all positives (SupCon ``L_out``). Ignored without ``group_ids``.
        gather_distributed: use the views of all ranks as negatives when ``torch.distributed`` is
            initialised with more than one process (see the module docstring for exact semantics).

    ``forward(z1, z2, group_ids=None, return_accuracy=False)`` takes two ``(N, D)`` projections of the
    same ``N`` items and returns the scalar loss, or ``(loss, top1_accuracy)``. ``group_ids`` is a 1-D
    tensor or a sequence of hashables (e.g. patient id strings), one per item.
    """

    def __init__(
        self, temperature: float = 0.1, same_group: SameGroupMode = "mask", gather_distributed: bool = True
    ) -> None:
        super().__init__()
        _check_args(temperature, same_group)
        self.temperature = float(temperature)
        self.same_group = same_group
        self.gather_distributed = gather_distributed

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        group_ids: GroupIds | None = None,
        return_accuracy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        loss, acc = _ntxent(z1, z2, self.temperature, group_ids, self.same_group, self.gather_distributed)
        return (loss, acc) if return_accuracy else loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, same_group={self.same_group!r}, gather_distributed={self.gather_distributed}"
