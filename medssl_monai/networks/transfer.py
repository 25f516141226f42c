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
import math
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets.resnet import ResNet

__all__ = [
    "TRANSFER_MODES",
    "TransferReport",
    "WeightTransferError",
    "extract_state_dict",
    "import_torchvision_resnet",
    "load_backbone_weights",
    "map_torchvision_resnet_key",
    "stage_keys",
]

logger = logging.getLogger(__name__)

TRANSFER_MODES = ("full", "first_k", "mean_var")

#: entries under which training code commonly nests the weights, most specific first
_WRAPPER_KEYS = ("backbone", "state_dict", "model_state_dict", "model", "network", "net", "encoder")

Checkpoint = str | os.PathLike | Mapping[str, Any] | nn.Module


@dataclass
class TransferReport:
    """What happened to every key of a weight transfer.

    Attributes:
        mode: ``full``, ``first_k`` or ``mean_var``.
        prefix: prefix stripped from the checkpoint keys (e.g. ``"backbone."``, ``"module.encoder."``).
        stages: stages in scope (all for ``full``; the first k for ``first_k``).
        loaded: model keys that received a value (copied, or redrawn for ``mean_var``).
        missing: model keys in scope without a checkpoint entry.
        unexpected: checkpoint keys that match nothing in the model (or no known layout); with ``k``, only
            those inside the first k stages (e.g. a conv bias the model lacks).
        mismatched: model key -> (checkpoint shape, model shape) for in-scope keys whose shapes differ.
        skipped: checkpoint keys deliberately not used: outside the selected prefix, beyond stage k (or in no
            stage, for ``first_k``), ignored by pattern (e.g. torchvision's ``fc.*``), or non-tensor entries.
        untouched: model keys deliberately left as they were: stages beyond k, ignored patterns, buffers in
            ``mean_var`` mode, and ``num_batches_tracked`` counters absent from older checkpoints.
        adapted: model keys whose value was adapted to fit (first conv to a different number of channels).
    """

    mode: str
    prefix: str = ""
    stages: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing, unexpected or shape-mismatched keys."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (
            f"mode={self.mode} prefix={self.prefix!r} stages={self.stages}: loaded {len(self.loaded)}, "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, mismatched {len(self.mismatched)}, "
            f"skipped {len(self.skipped)}, untouched {len(self.untouched)}, adapted {len(self.adapted)}"
        )

    def problems(self) -> str:
        """Multi-line listing of every missing / mismatched / unexpected key ("" if none)."""
        lines = []
        if self.missing:
            lines.append(f"missing from checkpoint ({len(self.missing)}): {', '.join(self.missing)}")
        if self.mismatched:
            shapes = ", ".join(
                f"{k} (checkpoint {tuple(s)} vs model {tuple(t)})" for k, (s, t) in self.mismatched.items()
            )
            lines.append(f"shape mismatch ({len(self.mismatched)}): {shapes}")
        if self.unexpected:
            lines.append(f"unexpected in checkpoint ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        problems = self.problems()
        return self.summary() + (f"\n{problems}" if problems else "")


class WeightTransferError(RuntimeError):
    """Strict weight transfer found missing / mismatched / unexpected keys; ``.report`` has the details."""

    def __init__(self, report: TransferReport) -> None:
        self.report = report
        super().__init__(
            f"strict weight transfer failed ({report.summary()}); the model was not modified.\n"
            f"{report.problems()}\n"
            "Use strict=False to load what matches, or prefix=/ignore= to select checkpoint keys."
        )


def extract_state_dict(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a checkpoint from any phase, plus the names of non-tensor entries that were dropped.

    Accepts a path (loaded with ``weights_only=True`` on CPU), a module, a raw state dict, or a dict nesting
    one under ``backbone`` / ``state_dict`` / ``model`` / ``network`` / ... (ignite, Lightning, bundles).
    """
    obj: Any = checkpoint
    if isinstance(obj, str | os.PathLike):
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    for _ in range(len(_WRAPPER_KEYS) + 1):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise TypeError(
                f"expected a state dict, checkpoint dict, module or path, got {type(obj).__name__}."
            )
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping | nn.Module)), None)
        if inner is None:
            break
        obj = inner
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found in the checkpoint; its top-level keys are {list(obj)[:20]}.")
    return tensors, [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]


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


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
#: torchvision ResNet key -> MONAI ResNet key. MONAI 1.x happens to use the same names (its projection shortcut
#: is ``nn.Sequential(conv, norm)`` -> ``downsample.0/1``); the explicit table is what rejects unknown keys and
#: is the single place to change if either naming moves.
_TORCHVISION_TO_MONAI: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"conv1\.weight"), r"conv1.weight"),
    (re.compile(rf"bn1\.{_BN}"), r"bn1.\1"),
    (re.compile(r"layer([1-4])\.(\d+)\.conv([1-3])\.weight"), r"layer\1.\2.conv\3.weight"),
    (re.compile(rf"layer([1-4])\.(\d+)\.bn([1-3])\.{_BN}"), r"layer\1.\2.bn\3.\4"),
    (re.compile(r"layer([1-4])\.(\d+)\.downsample\.0\.weight"), r"layer\1.\2.downsample.0.weight"),
    (re.compile(rf"layer([1-4])\.(\d+)\.downsample\.1\.{_BN}"), r"layer\1.\2.downsample.1.\3"),
)
_TORCHVISION_SKIPPED = ("fc.*",)


def map_torchvision_resnet_key(key: str) -> str | None:
    """MONAI ``ResNet`` key for a torchvision ResNet key, or ``None`` if it is not part of that layout."""
    for pattern, replacement in _TORCHVISION_TO_MONAI:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters for ``in_channels`` inputs: sum for 1 channel, else tile and rescale by 3 / in_channels.

    Keeps the response to a grey image equal to the RGB model's response to the same grey image in all
    channels (the rule timm uses).
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / weight.shape[1])
    tiled = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)


def import_torchvision_resnet(
    backbone: nn.Module,
    path_or_state_dict: Checkpoint,
    mode: str = "full",
    k: int | None = None,
    strict: bool = True,
    prefix: str | None = None,
    adapt_first_conv: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> TransferReport:
    """Load a torchvision-layout ResNet checkpoint (a local file; nothing is downloaded) into a MONAI ResNet.

    ``fc.*`` is dropped and listed as ``skipped``; keys outside torchvision's layout are ``unexpected``.
    With ``adapt_first_conv`` an RGB ``conv1`` is adapted to the backbone's input channels (e.g. grayscale)
    and listed in ``adapted``. The backbone needs torchvision's shortcuts (1x1 conv + BN, no bias), as the
    registered ``resnet*`` backbones have. ``mode``/``k``/``seed`` work as in :func:`load_backbone_weights`.
    """
    if not isinstance(backbone, ResNet):
        raise TypeError(f"expected a MONAI ResNet backbone, got {type(backbone).__name__}.")
    _check_mode(mode, k)
    report = TransferReport(mode=mode)
    state, non_tensors = extract_state_dict(path_or_state_dict)
    report.skipped.extend(non_tensors)

    def is_known(key: str) -> bool:
        return map_torchvision_resnet_key(key) is not None

    selected = _select_prefix(state, prefix, is_known, report)
    source: dict[str, torch.Tensor] = {}
    for key, value in selected.items():
        mapped = map_torchvision_resnet_key(key)
        if _matches(key, _TORCHVISION_SKIPPED):
            report.skipped.append(report.prefix + key)
        elif mapped is None:
            report.unexpected.append(report.prefix + key)
        else:
            source[mapped] = value

    conv1 = backbone.state_dict().get("conv1.weight")
    src_conv1 = source.get("conv1.weight")
    if (
        adapt_first_conv
        and conv1 is not None
        and src_conv1 is not None
        and src_conv1.shape[1] != conv1.shape[1]
        and src_conv1.shape[:1] + src_conv1.shape[2:] == conv1.shape[:1] + conv1.shape[2:]
    ):
        source["conv1.weight"] = _adapt_input_conv(src_conv1, conv1.shape[1])
        report.adapted.append("conv1.weight")
    # a MONAI ResNet built with feed_forward=True has its own fc: not part of the transfer
    return _transfer(
        backbone, source, report, k, strict, _TORCHVISION_SKIPPED, _make_generator(generator, seed)
    )
