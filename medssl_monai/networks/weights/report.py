"""The account of a weight transfer: every checkpoint and model key ends up in one list of a report."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TransferReport", "WeightTransferError"]


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
