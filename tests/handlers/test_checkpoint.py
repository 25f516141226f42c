"""TrainingCheckpoint: exact resume (in-process and after a real SIGKILL), atomic writes, weights_only loading."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medssl_monai.handlers.checkpoint import (
    RNGState,
    TrainingCheckpoint,
    UnsafeCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    save_model_atomic,
)

REPO = Path(__file__).resolve().parents[2]
EPOCH_LEN = 5  # 20 samples, batch 4


# ----------------------------------------------------------------------------------------------- helpers
def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class _Run:
    """A tiny training setup whose every iteration draws from the torch, numpy and python RNGs."""

    def __init__(self, init_seed: int) -> None:
        with torch.random.fork_rng(devices=[]):  # different weights per "process", global RNG untouched
            torch.manual_seed(init_seed)
            self.model = nn.Linear(6, 2)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda it: 0.97**it)
        data = torch.randn(20, 6, generator=torch.Generator().manual_seed(5))
        self.loader = DataLoader(TensorDataset(data), batch_size=4, shuffle=True)  # order from torch's RNG
        self.inputs: list[torch.Tensor] = []
        self.epochs_started: list[int] = []
        self.trainer = Engine(self._step)
        self.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: self.epochs_started.append(e.state.epoch))

    def _step(self, engine: Engine, batch: list[torch.Tensor]) -> float:
        (x,) = batch
        x = x + 0.1 * torch.randn_like(x) + torch.from_numpy(np.random.normal(0, 0.1, x.shape).astype(np.float32))
        if random.random() < 0.5:
            x = x.flip(-1)
        loss = (self.model(x) - x[:, :2]).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.inputs.append(x)
        return loss.item()

    def objects(self) -> dict:
        return {"model": self.model, "optimizer": self.opt, "lr_scheduler": self.sched}


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _rng_draws() -> tuple:
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[_Run, tuple, Path]:
    """The uninterrupted reference: 4 epochs, then the next RNG draws."""
    folder = tmp_path_factory.mktemp("full")
    _seed_all(0)
    run = _Run(init_seed=1)
    TrainingCheckpoint(folder, run.objects()).attach(run.trainer)
    run.trainer.run(run.loader, max_epochs=4)
    return run, _rng_draws(), folder


# ------------------------------------------------------------------------------------ (a) in-process resume
@pytest.mark.parametrize("interruption", ["crash_mid_epoch_3", "finished_2_of_2_then_extended"])
def test_resume_equals_uninterrupted(full_run, tmp_path, interruption):
    ref, ref_draws, _ = full_run
    _seed_all(0)
    first = _Run(init_seed=1)
    TrainingCheckpoint(tmp_path, first.objects(), resume=True).attach(first.trainer)
    if interruption == "crash_mid_epoch_3":
        @first.trainer.on(Events.ITERATION_COMPLETED(once=2 * EPOCH_LEN + 2))
        def _crash(_):
            raise RuntimeError("simulated crash")

        with pytest.raises(RuntimeError, match="simulated crash"):
            first.trainer.run(first.loader, max_epochs=4)
    else:
        first.trainer.run(first.loader, max_epochs=2)  # checkpoint says max_epochs=2; the resumed run wants 4

    # "new process": different RNG state and different initial weights, new engine
    _seed_all(123)
    second = _Run(init_seed=7)
    handler = TrainingCheckpoint(tmp_path, second.objects(), resume=True)
    handler.attach(second.trainer)
    state = second.trainer.run(second.loader, max_epochs=4)

    assert handler.resumed_from is not None and handler.resumed_from.name == f"checkpoint_{2 * EPOCH_LEN}.pt"
    assert second.epochs_started == [3, 4]  # not 1..4, and not 0 epochs (Ignite's max_epochs handling)
    assert state.epoch == 4 and state.iteration == 4 * EPOCH_LEN and state.max_epochs == 4
    _assert_same(second.inputs, ref.inputs[2 * EPOCH_LEN:], "RNG-driven inputs")  # augmentation + data order
    _assert_same(second.model.state_dict(), ref.model.state_dict(), "model")
    _assert_same(second.opt.state_dict(), ref.opt.state_dict(), "optimizer")
    _assert_same(second.sched.state_dict(), ref.sched.state_dict(), "lr_scheduler")
    assert second.sched.get_last_lr() == ref.sched.get_last_lr()
    for got, want in zip(_rng_draws(), ref_draws):  # the generators continue identically after the run
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the adopted files of the first run were rotated away: n_saved=2 counts across the restart
    assert [it for it, _ in list_checkpoints(tmp_path)] == [3 * EPOCH_LEN, 4 * EPOCH_LEN]


def test_restarting_a_finished_run_does_nothing_and_max_epochs_is_checked(full_run):
    ref, _, folder = full_run
    again = _Run(init_seed=3)
    TrainingCheckpoint(folder, again.objects(), resume=True).attach(again.trainer)
    state = again.trainer.run(again.loader, max_epochs=4)
    assert again.inputs == [] and state.iteration == 4 * EPOCH_LEN
    _assert_same(again.model.state_dict(), ref.model.state_dict(), "model")

    shorter = _Run(init_seed=3)
    TrainingCheckpoint(folder, shorter.objects(), resume=True).attach(shorter.trainer)
    with pytest.raises(ValueError, match="beyond this run's max_epochs=3"):
        shorter.trainer.run(shorter.loader, max_epochs=3)


class _EpochCounter:
    """Stands for an epoch-level LR scheduler: state that changes at EPOCH_COMPLETED."""

    def __init__(self) -> None:
        self.epochs = torch.tensor(0)

    def state_dict(self) -> dict:
        return {"epochs": self.epochs.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = state["epochs"].clone()


def test_iteration_interval_and_mid_epoch_resume(tmp_path):
    _seed_all(0)
    first = _Run(init_seed=1)
    counter = _EpochCounter()
    first.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: counter.epochs.add_(1))  # before saving
    TrainingCheckpoint(tmp_path, {**first.objects(), "counter": counter}, n_saved=None,
                       save_interval_iters=3).attach(first.trainer)

    @first.trainer.on(Events.ITERATION_COMPLETED(once=8))
    def _crash(_):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        first.trainer.run(first.loader, max_epochs=3)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [3, 5, 6]  # every 3 iterations + epoch ends
    # iteration 15 is both an iteration save and an epoch end: one save, after the epoch-end handlers
    # (checked on a second folder with 5-iteration saves)
    counter_5 = _EpochCounter()
    run_5 = _Run(init_seed=1)
    run_5.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: counter_5.epochs.add_(1))
    TrainingCheckpoint(tmp_path / "every5", {"counter": counter_5}, save_interval_iters=EPOCH_LEN,
                       n_saved=None).attach(run_5.trainer)
    run_5.trainer.run(run_5.loader, max_epochs=2)
    for it, path in list_checkpoints(tmp_path / "every5"):
        assert torch.load(path, weights_only=True)["counter"]["epochs"] == it // EPOCH_LEN

    second = _Run(init_seed=2)
    TrainingCheckpoint(tmp_path, second.objects(), n_saved=None, save_interval_iters=3, resume=True).attach(
        second.trainer)
    state = second.trainer.run(second.loader, max_epochs=3)
    assert second.epochs_started == [2, 3]
    assert len(second.inputs) == 3 * EPOCH_LEN - 6  # resumed at iteration 6, finished epoch 2, ran epoch 3
    assert state.iteration == 3 * EPOCH_LEN
    assert [it for it, _ in list_checkpoints(tmp_path)] == [3, 5, 6, 9, 10, 12, 15]


def test_resume_through_a_monai_workflow_train_handler(tmp_path):
    """MONAI calls ``handler.attach(engine)`` for ``train_handlers``: ``resume=True`` from the constructor."""
    from monai.engines import SupervisedTrainer

    def build(folder: Path, crash: bool) -> tuple[SupervisedTrainer, list[int], nn.Module]:
        torch.manual_seed(0)
        net = nn.Linear(4, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        data = [{"image": torch.randn(3, 4, generator=g), "label": torch.randint(0, 2, (3,), generator=g)}
                for _ in range(4)]
        trainer = SupervisedTrainer(
            device="cpu", max_epochs=4, train_data_loader=data, network=net, optimizer=opt,
            loss_function=nn.CrossEntropyLoss(),
            train_handlers=[TrainingCheckpoint(folder, {"model": net, "optimizer": opt}, resume=True)],
        )
        epochs: list[int] = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
        if crash:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=10), _raise_crash)
        return trainer, epochs, net

    reference, _, ref_net = build(tmp_path / "reference", crash=False)
    reference.run()
    crashed, _, _ = build(tmp_path / "run", crash=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.run()
    resumed, epochs, net = build(tmp_path / "run", crash=False)
    resumed.run()
    assert epochs == [3, 4] and resumed.state.iteration == 16
    _assert_same(net.state_dict(), ref_net.state_dict(), "model")


def _raise_crash(_: Engine) -> None:
    raise RuntimeError("simulated crash")


def test_attach_refuses_foreign_checkpoints_without_resume(full_run):
    _, _, folder = full_run
    run = _Run(init_seed=0)
    with pytest.raises(ValueError, match="resume=True"):
        TrainingCheckpoint(folder, run.objects()).attach(run.trainer)
    with pytest.raises(ValueError, match="reserved"):
        TrainingCheckpoint(folder, {"rng": RNGState()})


# --------------------------------------------------------------------------------------- (b) a real kill -9
_SCRIPT = textwrap.dedent("""
    import random, sys, time
    from pathlib import Path
    import numpy as np, torch
    from torch import nn
    from ignite.engine import Engine, Events
    from medssl_monai.handlers.checkpoint import TrainingCheckpoint, save_model_atomic

    torch.set_num_threads(1)
    ckpt_dir, out, max_epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0); np.random.seed(0); random.seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (1.0 + 0.05 * it))
    data = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8, shuffle=True)

    def step(engine, batch):
        (x,) = batch
        x = x + 0.1 * torch.randn_like(x) + float(np.random.normal(0, 0.1)) * (random.random() < 0.5)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        time.sleep(0.075)  # 4 iterations: ~0.3 s per epoch
        return loss.item()

    trainer = Engine(step)
    TrainingCheckpoint(ckpt_dir, {"model": model, "optimizer": opt, "lr_scheduler": sched}, resume=True).attach(trainer)

    def mark(text):
        with open(out.with_suffix(".log"), "a") as f:
            f.write(text + "\\n")

    trainer.add_event_handler(Events.STARTED, lambda e: mark(f"start {e.state.epoch}"))  # after the resume
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: mark(f"epoch {e.state.epoch}"))
    trainer.run(loader, max_epochs=max_epochs)
    save_model_atomic(model, out)
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_sigkill_and_restart_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    max_epochs = 6

    def cmd(name: str) -> list[str]:
        return [sys.executable, str(script), str(tmp_path / f"ckpt_{name}"), str(tmp_path / f"{name}.pt"),
                str(max_epochs)]

    def start(name: str) -> subprocess.Popen:  # stderr to a file: a full pipe would block the child
        with open(tmp_path / f"{name}.stderr", "w") as err:
            return subprocess.Popen(cmd(name), env=env, stdout=subprocess.DEVNULL, stderr=err)

    reference, victim = start("reference"), start("victim")
    try:
        deadline = time.monotonic() + 60
        while latest_checkpoint(tmp_path / "ckpt_victim") is None:
            assert victim.poll() is None, f"victim exited early: {(tmp_path / 'victim.stderr').read_text()}"
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.005)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        assert not (tmp_path / "victim.pt").exists()
        killed_at = latest_checkpoint(tmp_path / "ckpt_victim")
        saved_epoch = int(killed_at.stem.split("_")[-1]) // 4
        assert 1 <= saved_epoch < max_epochs

        restart = subprocess.run(cmd("victim"), env=env, capture_output=True, text=True, timeout=60)
        assert restart.returncode == 0, restart.stderr
        assert reference.wait(timeout=60) == 0, (tmp_path / "reference.stderr").read_text()
    finally:
        for proc in (victim, reference):  # only ever still running when the test failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    log = (tmp_path / "victim.log").read_text().split()
    second = log[log.index("start", 2):]  # the restarted process's lines
    assert log[:2] == ["start", "0"]
    assert second[:2] == ["start", str(saved_epoch)]  # it resumed, not from 0
    assert second[2:] == [w for e in range(saved_epoch + 1, max_epochs + 1) for w in ("epoch", str(e))]
    assert (tmp_path / "reference.log").read_text().split()[-2:] == ["epoch", str(max_epochs)]
    got = torch.load(tmp_path / "victim.pt", weights_only=True)
    want = torch.load(tmp_path / "reference.pt", weights_only=True)
    _assert_same(got, want, "final weights")


# ----------------------------------------------------------------------------------------- (c) atomicity
def test_writes_go_to_a_temp_file_in_the_same_folder_then_rename(tmp_path, monkeypatch):
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        assert src.parent == dst.parent  # same folder -> same file system -> atomic rename
        assert src.name.startswith(f".{dst.name}.") and src.name.endswith(".tmp")
        assert latest_checkpoint(dst.parent) != dst  # the final name does not exist before the rename
        assert torch.load(src, weights_only=True)["trainer"]["iteration"] > 0  # complete before it is renamed
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    run = _Run(init_seed=0)
    TrainingCheckpoint(tmp_path, run.objects(), n_saved=1).attach(run.trainer)
    run.trainer.run(run.loader, max_epochs=3)
    assert [d.name for _, d in renames] == [f"checkpoint_{i * EPOCH_LEN}.pt" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint_{3 * EPOCH_LEN}.pt"]  # no leftovers


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated failure while serialising")


class _Flaky:
    """State that cannot be written once ``broken`` is set (after a large tensor, i.e. mid-save)."""

    def __init__(self) -> None:
        self.broken = False

    def state_dict(self) -> dict:
        state = {"big": torch.zeros(200_000)}
        if self.broken:
            state["bad"] = _Unpicklable()
        return state

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.mark.parametrize("failure", ["unpicklable_state", "disk_full_after_half_the_bytes"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    run = _Run(init_seed=0)
    flaky = _Flaky()
    TrainingCheckpoint(tmp_path, {**run.objects(), "flaky": flaky}, n_saved=1).attach(run.trainer)
    if failure == "disk_full_after_half_the_bytes":
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            if not flaky.broken:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(28, "No space left on device (simulated)")

        monkeypatch.setattr(torch, "save", half_save)

    run.trainer.add_event_handler(Events.EPOCH_STARTED(once=2), lambda _: setattr(flaky, "broken", True))
    with pytest.raises((RuntimeError, OSError), match="simulated"):
        run.trainer.run(run.loader, max_epochs=3)

    # n_saved=1: Ignite asked to delete epoch 1's file before writing epoch 2's; it must still be there
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint_{EPOCH_LEN}.pt"]  # no partial, no temp
    restored = _Run(init_seed=9)
    engine = Engine(lambda e, b: None)
    load_training_state(tmp_path / f"checkpoint_{EPOCH_LEN}.pt", {**restored.objects(), "trainer": engine})
    assert engine.state.iteration == EPOCH_LEN and engine.state.epoch == 1


def test_stale_temp_files_of_a_killed_write_are_removed_on_resume(tmp_path):
    stale = tmp_path / ".checkpoint_10.pt.abc123.tmp"
    stale.write_bytes(b"PK\x03\x04 truncated")
    other = tmp_path / "notes.tmp"
    other.write_text("not ours")
    run = _Run(init_seed=0)
    TrainingCheckpoint(tmp_path, run.objects(), resume=True).attach(run.trainer)
    assert not stale.exists() and other.exists()
    assert latest_checkpoint(tmp_path) is None  # a temp file is never taken for a checkpoint


# ------------------------------------------------------------------------------------- (d) weights_only
def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    _seed_all(42)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)  # and in python's
    path = tmp_path / "rng.pt"
    torch.save(RNGState().state_dict(), path)
    expected = (_rng_draws(), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)])

    _seed_all(7)  # move every generator elsewhere
    _rng_draws()
    RNGState().load_state_dict(torch.load(path, weights_only=True))
    got = (_rng_draws(), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)])
    for g, e in zip(got[0], expected[0]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_state_that_needs_pickle_is_refused_at_save_time(tmp_path):
    class NumpyState:
        def state_dict(self):
            return {"mean": np.arange(3.0)}

        def load_state_dict(self, state):
            pass

    run = _Run(init_seed=0)
    TrainingCheckpoint(tmp_path, {**run.objects(), "stats": NumpyState()}).attach(run.trainer)
    with pytest.raises(UnsafeCheckpointError, match=r"numpy.*torch\.as_tensor"):
        run.trainer.run(run.loader, max_epochs=1)
    assert list(tmp_path.iterdir()) == []  # nothing unloadable was published


class _Payload:
    pass


def test_loading_a_pickle_only_checkpoint_fails_clearly(tmp_path):
    path = tmp_path / "checkpoint_5.pt"
    model = nn.Linear(2, 2)
    torch.save({"model": model.state_dict(), "extra": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_5\.pt.*weights_only=True.*_Payload"):
        load_training_state(path, {"model": model})
    with pytest.raises(KeyError, match="optimizer"):
        torch.save({"model": model.state_dict()}, path)
        load_training_state(path, {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=1)})


def test_save_model_atomic_writes_a_plain_state_dict(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    path = save_model_atomic(nn.DataParallel(model), tmp_path / "models" / "model.pt")
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(model.state_dict())  # no "module." prefix
    _assert_same(loaded, model.state_dict(), "weights")
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]
    with pytest.raises(TypeError, match="only tensors"):
        save_model_atomic({"w": torch.ones(1), "meta": {"epoch": 3}}, tmp_path / "bad.pt")
