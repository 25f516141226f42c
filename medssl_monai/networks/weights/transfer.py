"""Weight transfer between pretraining, fine-tuning and Transfusion-style studies (Raghu et al. 2019).

Three ways of initialising a backbone from a checkpoint:

* ``full``: copy every tensor (the usual "pretrained" init).
* ``first_k``: copy only the first ``k`` stages (by the backbone's ``stage_names``); later stages keep their
  fresh init. These are Transfusion's hybrid models, and the later stages may be narrower ("slimmed") than
  the checkpoint's, because only the reused stages have to match.
* ``mean_var``: Transfusion's Mean-Var init: each *parameter* tensor is redrawn i.i.d. from
  N(mean, var) of the corresponding pretrained tensor, which keeps the scale of the pretrained weights but
  none of their structure. BatchNorm weights/biases and conv/linear biases follow the same rule; tensors with
  a single element, and integer tensors, are copied; shapes must still match. *Buffers* (BatchNorm running
  mean/var, batch counters) are not transferred: they are statistics of the pretrained weights' activations
  and would be wrong for the redrawn weights, so they keep their fresh values (listed as ``untouched``) and
  are re-estimated in training. Draws are reproducible given ``seed`` or a ``torch.Generator``; ``k`` limits
  the redraw to the first ``k`` stages.

Nothing is skipped silently: every key ends up in one list of the returned :class:`TransferReport`. In strict
mode any missing, shape-mismatched or unexpected key raises :class:`WeightTransferError` *before* anything is
written, so a failed strict load leaves the backbone unchanged.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .report import TransferReport, WeightTransferError
from .state_dict import Checkpoint, extract_state_dict

__all__ = ["TRANSFER_MODES", "load_backbone_weights", "stage_keys"]

logger = logging.getLogger(__name__)

TRANSFER_MODES = ("full", "first_k", "mean_var")


def _infer_prefix(keys: Iterable[str], is_known: Callable[[str], bool]) -> str:
    """The key prefix (at '.' boundaries) whose removal makes the most keys known; ties -> shortest.

    Handles ``module.`` (DataParallel), ``_orig_mod.`` (torch.compile), ``backbone.`` (SSLModel/Classifier),
    ``encoder.``/``model.`` and any nesting of them, without a hard-coded list.
    """
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            prefix = ".".join(parts[:i]) + "." if i else ""
            if is_known(key[len(prefix) :]):
                counts[prefix] += 1
    if not counts:
        return ""
    return min(counts, key=lambda p: (-counts[p], len(p)))


def _select_prefix(
    state: Mapping[str, torch.Tensor],
    prefix: str | None,
    is_known: Callable[[str], bool],
    report: TransferReport,
) -> dict[str, torch.Tensor]:
    chosen = _infer_prefix(state, is_known) if prefix is None else prefix
    report.prefix = chosen
    selected: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(chosen):
            selected[key[len(chosen) :]] = value
        else:
            report.skipped.append(key)
    return selected


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def stage_keys(backbone: nn.Module) -> OrderedDict[str, list[str]]:
    """State-dict keys of ``backbone`` grouped by stage (keys of no stage are left out).

    Keys are matched by tensor identity, so it works for any backbone whose ``stages()`` modules share their
    tensors with the backbone, including views such as the ResNet stem that are not registered submodules.
    """
    if not hasattr(backbone, "stages"):
        raise TypeError(f"{type(backbone).__name__} has no stages(); first_k needs a staged backbone.")
    owner: dict[int, str] = {}
    for name, module in backbone.stages().items():
        for tensor in module.state_dict(keep_vars=True).values():
            owner[id(tensor)] = name
    groups: OrderedDict[str, list[str]] = OrderedDict((name, []) for name in backbone.stages())
    for key, tensor in backbone.state_dict(keep_vars=True).items():
        if id(tensor) in owner:
            groups[owner[id(tensor)]].append(key)
    return groups


def _stage_of_key(backbone: nn.Module) -> Callable[[str], str | None]:
    """``key -> stage`` for any key, also one the backbone lacks, by its nearest registered parent module.

    ``first_k`` needs it to tell a checkpoint key *inside* a reused stage that matches nothing (e.g. a conv
    bias the target does not have: a problem) from a key of a later or absent stage (deliberately skipped).
    """
    names: dict[int, list[str]] = {}
    for name, module in backbone.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    module_stage: dict[str, str] = {}
    for stage, module in backbone.stages().items():
        for sub in module.modules():
            for name in names.get(id(sub), []):
                module_stage.setdefault(name, stage)

    def stage_of(key: str) -> str | None:
        parts = key.split(".")[:-1]
        while parts:
            stage = module_stage.get(".".join(parts))
            if stage is not None:
                return stage
            parts.pop()
        return None

    return stage_of


def _mean_var_sample(
    source: torch.Tensor, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    src = source.detach().to("cpu", torch.float64)
    std, mean = torch.std_mean(src)
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    noise = torch.randn(tuple(like.shape), generator=generator, dtype=dtype)
    return noise.mul_(std.to(dtype)).add_(mean.to(dtype))


def _transfer(
    backbone: nn.Module,
    source: Mapping[str, torch.Tensor],
    report: TransferReport,
    k: int | None,
    strict: bool,
    ignore: Sequence[str],
    generator: torch.Generator | None,
) -> TransferReport:
    """Plan every key, raise in strict mode if anything is off, then write."""
    mode = report.mode
    target = backbone.state_dict(keep_vars=True)
    param_names = {name for name, _ in backbone.named_parameters(remove_duplicate=False)}
    if k is None:
        scope = set(target)
        report.stages = list(getattr(backbone, "stage_names", []))
    else:
        groups = stage_keys(backbone)
        names = list(groups)
        if not 1 <= k <= len(names):
            raise ValueError(f"k must be in [1, {len(names)}] for stages {names}, got {k}.")
        report.stages = names[:k]
        scope = {key for name in report.stages for key in groups[name]}
    scope = {key for key in scope if not _matches(key, ignore)}

    plan: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = []
    for key, tgt in target.items():
        if key not in scope or (mode == "mean_var" and key not in param_names):
            report.untouched.append(key)
            continue
        if key not in source:
            # BatchNorm's step counter is absent from older (e.g. torchvision) checkpoints and harmless
            (report.untouched if key.endswith("num_batches_tracked") else report.missing).append(key)
            continue
        src = source[key]
        if src.shape != tgt.shape:
            report.mismatched[key] = (tuple(src.shape), tuple(tgt.shape))
            continue
        if mode == "mean_var" and tgt.is_floating_point() and src.is_floating_point() and tgt.numel() > 1:
            plan.append((tgt, lambda s=src, t=tgt: _mean_var_sample(s, t, generator)))
        else:
            plan.append((tgt, lambda s=src: s))
        report.loaded.append(key)
    stage_of = None if k is None else _stage_of_key(backbone)
    for key in source:
        if key in scope:
            continue
        in_scope = stage_of is None or stage_of(key) in report.stages
        if key not in target and in_scope and not _matches(key, ignore):
            report.unexpected.append(key)
        else:
            report.skipped.append(key)

    if not report.ok:
        if strict:
            raise WeightTransferError(report)
        logger.warning("weight transfer: %s\n%s", report.summary(), report.problems())
    else:
        logger.info("weight transfer: %s", report.summary())
    with torch.no_grad():
        for tgt, value in plan:  # in state-dict order, so mean_var draws are reproducible
            tgt.copy_(value())
    return report


def _check_mode(mode: str, k: int | None) -> None:
    if mode not in TRANSFER_MODES:
        raise ValueError(f"mode must be one of {TRANSFER_MODES}, got {mode!r}.")
    if mode == "first_k" and k is None:
        raise ValueError("mode='first_k' needs k (number of stages to reuse).")
    if mode == "full" and k is not None:
        raise ValueError("k only applies to mode='first_k' (or 'mean_var' limited to the first k stages).")


def _make_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return generator


def load_backbone_weights(
    backbone: nn.Module,
    checkpoint: Checkpoint,
    mode: str = "full",
    k: int | None = None,
    strict: bool = True,
    prefix: str | None = None,
    ignore: Sequence[str] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> TransferReport:
    """Initialise ``backbone`` from ``checkpoint`` and report what happened to every key.

    Args:
        backbone: the model to initialise (a registered backbone for ``first_k``).
        checkpoint: path, state dict, checkpoint dict (``model``/``state_dict``/``backbone`` entries) or module;
            e.g. a whole :class:`~medssl_monai.networks.heads.SSLModel` or ``Classifier``.
        mode: ``"full"``, ``"first_k"`` or ``"mean_var"`` (see the module docstring).
        k: number of leading stages for ``first_k``; optional for ``mean_var`` (default: all stages).
        strict: raise :class:`WeightTransferError` (model untouched) on missing / mismatched / unexpected keys;
            otherwise load what matches and log a warning.
        prefix: prefix of the checkpoint keys that belong to the backbone, stripped before matching.
            ``None`` infers it (``backbone.``, ``module.``, ``encoder.``, ...); ``""`` uses keys as they are.
            Keys outside the prefix are reported as ``skipped``.
        ignore: ``fnmatch`` patterns (after prefix stripping) of keys to leave out on purpose, on both sides,
            e.g. ``("fc.*",)`` for a MONAI ResNet saved with its classifier.
        seed, generator: randomness of ``mean_var``.

    Returns:
        the :class:`TransferReport`.
    """
    _check_mode(mode, k)
    report = TransferReport(mode=mode)
    state, non_tensors = extract_state_dict(checkpoint)
    report.skipped.extend(non_tensors)
    target_keys = set(backbone.state_dict())
    source = _select_prefix(state, prefix, target_keys.__contains__, report)
    return _transfer(backbone, source, report, k, strict, ignore, _make_generator(generator, seed))


