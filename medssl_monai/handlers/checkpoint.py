"""Atomic, resumable training checkpoints for Ignite / MONAI engines.

A pretraining run is hours of GPU time on a pre-emptible machine, so a killed run must restart exactly where
it stopped: same epoch and iteration, optimiser and LR-scheduler state, and the same random numbers (the
augmentations and the data order come from the global torch / numpy / python generators).

Why not MONAI's ``CheckpointSaver``: it writes with ``DiskSaver(atomic=False)``, so a kill during ``torch.save``
leaves a truncated file under the final name, and the next start resumes from garbage. Ignite's own
``DiskSaver(atomic=True)`` writes a temporary file and renames it, but ``Checkpoint`` deletes the superseded
checkpoint *before* it writes the new one (with ``n_saved=1`` a failed write leaves no checkpoint at all) and it
does not ``fsync``. :class:`TrainingCheckpoint` keeps Ignite's ``Checkpoint`` for naming and retention and swaps
in a saver that writes ``.<name>.<random>.tmp`` in the same folder, fsyncs, checks that the file loads with
``torch.load(weights_only=True)`` (a checkpoint that cannot be resumed from is worse than none: it is found
only after the crash), renames it, and only then deletes superseded files.

Checkpoints hold only tensors and plain containers, so they load with ``weights_only=True`` (no arbitrary code
runs when a checkpoint from elsewhere is opened).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ..utils.atomic import atomic_writer
from ..utils.rng import RNGState
from .checkpoint_files import latest_checkpoint, list_checkpoints

__all__ = [
    "RNGState",
    "TrainingCheckpoint",
    "UnsafeCheckpointError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_training_state",
    "save_model_atomic",
]

logger = logging.getLogger(__name__)

_RESERVED = ("trainer", "rng")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses (arbitrary pickled classes)."""


def _unsafe_message(path: str | Path, err: BaseException) -> str:
    text = str(err)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        what = f"it contains a pickled {m.group(1)}"
    else:
        m = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        what = m.group(1).strip() if m else (text.splitlines()[0] if text else repr(err))
    return (f"{path}: torch.load(weights_only=True) refused this checkpoint: {what}. Training checkpoints may "
            "only hold tensors, numbers, strings, None and lists/tuples/dicts of those, so that loading one "
            "cannot execute code; make every state_dict() return such values (e.g. convert numpy arrays with "
            "torch.as_tensor).")


# --------------------------------------------------------------------------------------------- atomic write
def _atomic_save(obj: Any, path: str | Path, verify_weights_only: bool = False) -> Path:
    """``torch.save`` to a hidden temp file beside ``path``, fsync, optionally verify, then ``os.replace``.

    The temp file is in the same folder so that the rename is atomic (same file system): readers see either
    the previous file or the complete new one under ``path``, never a partial one.
    """
    path = Path(path)

    def verify(tmp_name: str) -> None:
        try:  # mmap: only the pickled structure is read, not the tensor data
            torch.load(tmp_name, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(_unsafe_message(path, e)) from e

    with atomic_writer(path, check=verify if verify_weights_only else None) as f:
        torch.save(obj, f)
    return path


def save_model_atomic(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Atomically write a plain ``state_dict`` (tensor values only, on CPU), e.g. a bundle's ``models/model.pt``.

    ``DataParallel`` / ``DistributedDataParallel`` wrappers are unwrapped so that the keys have no ``module.``
    prefix. Raises ``TypeError`` for non-tensor values: a bundle's weights file must load with
    ``weights_only=True`` into a bare network.
    """
    if isinstance(model_or_state_dict, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model_or_state_dict = model_or_state_dict.module
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(f"expected an nn.Module or a state_dict, got {type(model_or_state_dict).__name__}")
    bad = {k: type(v).__name__ for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if bad:
        raise TypeError(f"a plain state_dict holds only tensors; non-tensor values: {bad}")
    plain = {str(k): v.detach().cpu() for k, v in state.items()}
    return _atomic_save(plain, path)


# ------------------------------------------------------------------------------------------ files & loading
def load_training_state(path: str | Path, objects: Mapping[str, Any]) -> dict[str, Any]:
    """Load ``path`` (``weights_only=True``, on CPU) into ``objects`` (name -> object with ``load_state_dict``).

    ``objects`` may be a subset of what the checkpoint holds (e.g. only ``{"model": model}``); a name missing
    from the checkpoint is an error, unless its object says ``optional = True`` (state added in a later
    version, such as the evaluator's best metric: older checkpoints still resume). Returns the checkpoint dict.

    Loading into a trainer directly (outside :class:`TrainingCheckpoint`) replaces its ``max_epochs`` with the
    checkpoint's; prefer ``TrainingCheckpoint(..., resume=True)``, which keeps the ``max_epochs`` of the run.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_unsafe_message(path, e)) from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} is not a training checkpoint (a dict of state_dicts), got {type(ckpt).__name__}")
    absent = [k for k in objects if k not in ckpt]
    missing = [k for k in absent if not getattr(objects[k], "optional", False)]
    if missing:
        raise KeyError(f"{path} has no state for {missing}; it holds {sorted(ckpt)}")
    for k in absent:
        logger.warning("%s has no state for %r (an older checkpoint): kept as initialised", path, k)
    present = {k: v for k, v in objects.items() if k in ckpt}
    Checkpoint.load_objects(to_load=present, checkpoint={k: ckpt[k] for k in present})
    return dict(ckpt)


class _AtomicDiskSaver(DiskSaver):
    """Ignite save handler: atomic + fsync + weights_only check; superseded files are deleted only afterwards.

    Ignite's ``Checkpoint`` calls ``remove(old)`` *before* saving the new file; deferring the deletion until the
    new file is in place means a failed or killed save never costs the last good checkpoint.
    """

    def __init__(self, dirname: str | Path, verify_weights_only: bool = True) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False)
        self.verify_weights_only = verify_weights_only
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        _atomic_save(checkpoint, self.dirname / filename, verify_weights_only=self.verify_weights_only)
        for name in self._superseded:
            if name != filename:
                (self.dirname / name).unlink(missing_ok=True)
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        if idist.get_rank() == self.save_on_rank:
            self._superseded.append(filename)


# --------------------------------------------------------------------------------------------------- handler
class TrainingCheckpoint:
    """Save (and resume) ``{**objects, "trainer": engine, "rng": RNGState()}`` atomically, keeping the last few.

    Files are ``{save_dir}/{file_prefix}_{iteration}.pt``, written at ``EPOCH_COMPLETED`` every
    ``save_interval_epochs`` epochs, at ``ITERATION_COMPLETED`` every ``save_interval_iters`` iterations, and at
    ``COMPLETED`` (so a finished run restarted with ``resume=True`` does nothing). When an iteration save falls
    on an epoch end that is also saved, only the ``EPOCH_COMPLETED`` one is written (it sees the epoch-end
    handlers' changes).

    With ``resume=True`` the latest checkpoint in ``save_dir`` (if any) is loaded at ``Events.STARTED``, so the
    same command restarts a killed run where it stopped. The engine keeps the ``max_epochs`` / ``max_iters`` it
    was run with (Ignite's ``Engine.load_state_dict`` would take the checkpoint's, so a run could neither be
    extended nor be told it is longer than the checkpointed one); a checkpoint beyond them is an error.

    Order matters: attach this handler *after* handlers that change saved state at ``EPOCH_COMPLETED`` (e.g. an
    epoch-level LR scheduler), or the checkpoint holds the state before their step; and attach it *before*
    ``STARTED`` handlers that should see the resumed state. A checkpoint written mid-epoch
    (``save_interval_iters``) resumes at the right iteration count, but Ignite restarts that epoch's data
    iterator from its beginning (batches are not skipped), so only epoch-boundary resumes are bit-exact.
    MONAI random transforms keep their own generators: with ``num_workers > 0`` (not ``persistent_workers``)
    each epoch's workers reseed them from torch's RNG, so they resume exactly; with ``num_workers=0`` MONAI's
    ``DataLoader`` seeds them once when it is built, so after a resume they replay from that seed.

    Args:
        save_dir: folder of the checkpoints (created).
        objects: name -> object with ``state_dict``/``load_state_dict`` (model, optimizer, lr_scheduler, scaler,
            ...). ``"trainer"`` and ``"rng"`` are added here and reserved.
        n_saved: how many checkpoints to keep (``None``: all).
        save_interval_epochs: save every this many epochs (``None``: not at epoch ends).
        save_interval_iters: also save every this many iterations (``None``: no).
        file_prefix: file name prefix.
        resume: default for :meth:`attach` (so a bundle config, where MONAI calls ``attach(engine)``, can ask).
    """

    def __init__(
        self,
        save_dir: str | Path,
        objects: Mapping[str, Any],
        n_saved: int | None = 2,
        save_interval_epochs: int | None = 1,
        save_interval_iters: int | None = None,
        file_prefix: str = "checkpoint",
        resume: bool = False,
    ) -> None:
        if not isinstance(objects, Mapping):
            raise TypeError(f"objects must be a dict name -> object with state_dict, got {type(objects).__name__}")
        reserved = [k for k in objects if k in _RESERVED]
        if reserved:
            raise ValueError(f"object names {reserved} are reserved (the engine and the RNG state are added)")
        for name, obj in objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"objects['{name}'] ({type(obj).__name__}) has no state_dict/load_state_dict")
        for name, value in (("save_interval_epochs", save_interval_epochs), ("save_interval_iters", save_interval_iters),
                            ("n_saved", n_saved)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        if not file_prefix or "/" in file_prefix or os.sep in file_prefix:
            raise ValueError(f"file_prefix must be a non-empty file name part, got {file_prefix!r}")
        self.save_dir = Path(save_dir)
        self.objects = dict(objects)
        self.n_saved = n_saved
        self.save_interval_epochs = save_interval_epochs
        self.save_interval_iters = save_interval_iters
        self.file_prefix = file_prefix
        self.resume_on_start = resume
        self.rng = RNGState()
        self.resumed_from: Path | None = None
        self._saver = _AtomicDiskSaver(self.save_dir)
        self._checkpoint: Checkpoint | None = None
        self._last_saved_iteration: int | None = None
        self._resume_pending = False

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint in ``save_dir`` (written by this run or adopted from an earlier one)."""
        return latest_checkpoint(self.save_dir, self.file_prefix)

    def _to_save(self, engine: Engine) -> dict[str, Any]:
        return {**self.objects, "trainer": engine, "rng": self.rng}

    def attach(self, engine: Engine, resume: bool | None = None) -> None:
        """Register the save events (and, with ``resume``, loading the latest checkpoint at ``STARTED``).

        Without ``resume``, a ``save_dir`` that already holds checkpoints of this prefix is an error: silently
        rotating (deleting) another run's checkpoints, or mixing two runs in one folder, is never wanted.
        """
        resume = self.resume_on_start if resume is None else resume
        existing = list_checkpoints(self.save_dir, self.file_prefix)
        if existing and not resume:
            raise ValueError(f"{self.save_dir} already holds checkpoints ({existing[-1][1].name}, ...); pass "
                             "resume=True to continue that run, or use an empty folder")
        self._remove_stale_temp_files()
        self._checkpoint = Checkpoint(
            self._to_save(engine),
            self._saver,
            filename_prefix=self.file_prefix,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
            filename_pattern="{filename_prefix}_{global_step}.{ext}",
        )
        # adopt the files of the interrupted run so that n_saved keeps counting them
        self._checkpoint.load_state_dict({"_saved": [(it, p.name) for it, p in existing]})
        if resume:
            self._resume_pending = True
            engine.add_event_handler(Events.STARTED, self._on_started)
        if self.save_interval_epochs is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval_epochs), self.save)
        if self.save_interval_iters is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval_iters), self._save_iteration)
        engine.add_event_handler(Events.COMPLETED, self._save_completed)

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a run killed mid-write (ours only: ``.{prefix}_{iteration}.pt.*.tmp``)."""
        if not self.save_dir.is_dir():
            return
        stale = re.compile(rf"^\.{re.escape(self.file_prefix)}_\d+\.pt\..+\.tmp$")
        for p in self.save_dir.iterdir():
            if stale.match(p.name):
                logger.info("removing temp file of an interrupted checkpoint write: %s", p)
                p.unlink(missing_ok=True)

    def _save_iteration(self, engine: Engine) -> None:
        state = engine.state
        epoch_end = state.epoch_length is not None and state.iteration % state.epoch_length == 0
        if epoch_end and self.save_interval_epochs is not None and state.epoch % self.save_interval_epochs == 0:
            return  # the EPOCH_COMPLETED save of this iteration follows, after the epoch-end handlers ran
        self.save(engine)

    def _save_completed(self, engine: Engine) -> None:
        if self._last_saved_iteration != engine.state.iteration:
            self.save(engine)

    def save(self, engine: Engine) -> Path:
        """Write ``{file_prefix}_{iteration}.pt`` now (replacing a file of the same iteration); returns its path."""
        if self._checkpoint is None:
            raise RuntimeError("call attach(engine) before saving")
        self._checkpoint(engine)
        self._last_saved_iteration = engine.state.iteration
        path = self.save_dir / f"{self.file_prefix}_{engine.state.iteration}.pt"
        logger.debug("saved checkpoint %s", path)
        return path

    def _on_started(self, engine: Engine) -> None:
        if self._resume_pending:  # only the first run() call resumes; later calls are the caller's business
            self._resume_pending = False
            self.resume(engine)

    def resume(self, engine: Engine, path: str | Path | None = None) -> Path | None:
        """Load ``path`` (default: the latest checkpoint) into the objects, the engine and the RNGs.

        Meant to run at ``Events.STARTED`` (``attach(resume=True)`` does that): the engine's current
        ``max_epochs`` / ``max_iters`` (the ones ``run`` was given) are kept. Returns the loaded path, or
        ``None`` when there is nothing to resume from.
        """
        path = self.last_checkpoint if path is None else Path(path)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.save_dir)
            return None
        state = engine.state
        prior_max_epochs, prior_max_iters, prior_epoch_length = state.max_epochs, state.max_iters, state.epoch_length
        load_training_state(path, self._to_save(engine))
        if prior_epoch_length is not None and state.epoch_length != prior_epoch_length:
            raise ValueError(f"{path} was written with epoch_length={state.epoch_length} but this run has "
                             f"epoch_length={prior_epoch_length} (different data or batch size): its epoch and "
                             "iteration counts would not match this run")
        if prior_max_epochs is not None or prior_max_iters is not None:
            if prior_max_epochs is not None and state.epoch > prior_max_epochs:
                raise ValueError(f"{path} is at epoch {state.epoch}, beyond this run's max_epochs={prior_max_epochs}")
            if prior_max_iters is not None and state.iteration > prior_max_iters:
                raise ValueError(f"{path} is at iteration {state.iteration}, beyond this run's "
                                 f"max_iters={prior_max_iters}")
            state.max_epochs, state.max_iters = prior_max_epochs, prior_max_iters
        self._last_saved_iteration = state.iteration
        self.resumed_from = path
        logger.info("resumed from %s (epoch %d, iteration %d)", path, state.epoch, state.iteration)
        return path
