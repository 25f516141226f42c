"""Results come from the bundles' per-epoch ``metrics.csv`` (MetricsCSV handler), not from TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from medssl_monai.experiments.results import final_validation, read_curve, steps_to_target
from medssl_monai.handlers import MetricsCSV


def _validated_run(out: Path, aucs: dict[int, float], epoch_length: int, max_epochs: int, start: int = 0) -> None:
    """An evaluator-like engine run once per 'validated' epoch, as ValidationHandler runs it."""
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def fill(engine: Engine) -> None:  # what the metrics attached to an evaluator leave behind
        auc = aucs[engine.state.epoch]
        engine.state.metrics.update({"auc_macro": auc, "balanced_accuracy": torch.tensor(auc / 2),
                                     "per_class": torch.tensor([0.1, 0.2]), "confusion": "not a number"})

    MetricsCSV(out, epoch_length=epoch_length, max_epochs=max_epochs).attach(evaluator)
    for epoch in sorted(aucs):
        if epoch > start:
            evaluator.state.max_epochs = epoch  # what MONAI's Evaluator.run(global_epoch) does
            evaluator.state.epoch = epoch - 1
            evaluator.state.iteration = 0
            evaluator.run([0, 1, 2], max_epochs=epoch)


def test_metrics_csv_rows_and_curve(tmp_path: Path) -> None:
    aucs = {1: 0.61, 2: 0.74, 3: 0.79, 4: 0.83, 5: 0.81}
    _validated_run(tmp_path, {e: a for e, a in aucs.items() if e <= 3} | {2: 0.5}, 7, 5)  # killed after epoch 3
    _validated_run(tmp_path, aucs, 7, 5, start=1)  # resumed: epochs 2..5 again, epoch 2 re-logged
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 2, 3, 4, 5]
    assert set(rows[0]) == {"epoch", "step", "max_epochs", "auc_macro", "balanced_accuracy"}  # scalars only
    assert float(rows[1]["auc_macro"]) == 0.5 and float(rows[3]["auc_macro"]) == pytest.approx(0.74)
    curve = read_curve(tmp_path)
    assert curve["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert curve["step"].tolist() == [7, 14, 21, 28, 35]  # epoch x training iterations per epoch
    assert curve["auc_macro"].tolist() == pytest.approx(list(aucs.values()))  # the last row of an epoch wins
    assert curve["balanced_accuracy"].tolist() == pytest.approx([a / 2 for a in aucs.values()])
    for target in (0.6, 0.75, 0.8, 0.82, 0.9):
        first = next((e for e, a in aucs.items() if a >= target), None)
        assert steps_to_target(curve, target) == (None if first is None else 7 * first)
    assert final_validation(tmp_path) == pytest.approx({"auc_macro": 0.81, "balanced_accuracy": 0.405})


def test_final_validation_from_csv_refuses_an_unvalidated_last_epoch(tmp_path: Path) -> None:
    _validated_run(tmp_path, {3: 0.7, 6: 0.7}, 5, 8)  # max_epochs 8, val_interval 3
    assert read_curve(tmp_path)["step"].tolist() == [15, 30]
    with pytest.raises(ValueError, match="multiple of val_interval"):
        final_validation(tmp_path)


def test_metrics_csv_on_a_trainer_counts_its_iterations(tmp_path: Path) -> None:
    """On a trainer (pretraining bundles) the step is the trainer's own iteration, the metric what the
    handlers before it put in ``engine.state.metrics`` (the k-NN monitor's accuracy)."""
    trainer = Engine(lambda e, b: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(knn_acc=e.state.epoch / 10))
    MetricsCSV(tmp_path / "out").attach(trainer)
    trainer.run(range(4), max_epochs=3)
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        rows = [(int(r["epoch"]), int(r["step"]), float(r["knn_acc"])) for r in csv.DictReader(f)]
    assert rows == [(1, 4, 0.1), (2, 8, 0.2), (3, 12, 0.3)]


def test_driver_overrides_reach_the_bundle_as_the_values_they_are():
    """The drivers' overrides go through MONAI's CLI (``fire``): each must parse back to the value given.
    JSON spellings once arrived as strings ('false' is truthy: a False switch was on)."""
    from fire import parser

    from medssl_monai.experiments.runner import _cli_value

    for value in (True, False, None, [96, 128], [1, None, "a b"], {"k": False}, 0.05, 3, "resnet18", "/a b/c.pt"):
        assert parser.DefaultParseValue(_cli_value(value)) == value, value
