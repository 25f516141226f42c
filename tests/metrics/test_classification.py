"""Classification metrics against independent references written here (pairwise AUC, explicit loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from references import ref_confusion

from medssl_monai.metrics.classification import (
    accuracy,
    attach_classification_metrics,
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    ignite_pred_label,
    metric_name,
    multilabel_auc,
    per_class_auc,
    roc_auc_ovr,
)


# ---------------------------------------------------------------------------------------------- references
def mann_whitney_auc(pos_scores, neg_scores) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), over every positive/negative pair."""
    total = 0.0
    for p in pos_scores:
        for n in neg_scores:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos_scores) * len(neg_scores))


def ref_balanced_accuracy(y_true, y_pred):
    recalls = []
    for c in sorted(set(y_true)):
        idx = [i for i, t in enumerate(y_true) if t == c]
        recalls.append(sum(1 for i in idx if y_pred[i] == c) / len(idx))
    return sum(recalls) / len(recalls)


def ref_ovr_auc(y_true, probs, c):
    pos = [probs[i][c] for i in range(len(y_true)) if y_true[i] == c]
    neg = [probs[i][c] for i in range(len(y_true)) if y_true[i] != c]
    if not pos or not neg:
        return math.nan
    return mann_whitney_auc(pos, neg)


def test_auc_closed_cases():
    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y] * 0.8 + 0.1
    assert roc_auc_ovr(y, perfect) == pytest.approx(1.0)
    reversed_ = 1.0 - perfect
    assert roc_auc_ovr(y, reversed_) == pytest.approx(0.0)
    np.testing.assert_allclose(roc_auc_ovr(y, reversed_, average="none"), [0.0, 0.0, 0.0])
    constant = np.full((6, 3), 1 / 3)
    assert roc_auc_ovr(y, constant) == pytest.approx(0.5)  # all ties count one half


def test_roc_auc_ovr_matches_pairwise_reference(multiclass_data):
    y, probs = multiclass_data
    per_class = roc_auc_ovr(y, probs, average="none")
    ref = [ref_ovr_auc(y.tolist(), probs.tolist(), c) for c in range(4)]
    np.testing.assert_allclose(per_class, ref, atol=1e-12)
    assert roc_auc_ovr(y, probs) == pytest.approx(np.mean(ref), abs=1e-12)
    assert 0.6 < np.mean(ref) < 1.0  # the data are informative but not perfect, so the check has teeth
    # also with tensors in
    assert roc_auc_ovr(torch.as_tensor(y), torch.as_tensor(probs)) == pytest.approx(np.mean(ref), abs=1e-12)


def test_roc_auc_ovr_skips_absent_class(multiclass_data):
    y, probs = multiclass_data
    keep = y != 2
    per_class = roc_auc_ovr(y[keep], probs[keep], average="none")
    assert math.isnan(per_class[2])
    ref = [ref_ovr_auc(y[keep].tolist(), probs[keep].tolist(), c) for c in (0, 1, 3)]
    np.testing.assert_allclose(per_class[[0, 1, 3]], ref, atol=1e-12)
    assert roc_auc_ovr(y[keep], probs[keep]) == pytest.approx(np.mean(ref), abs=1e-12)


def test_multilabel_auc_matches_reference_and_skips_single_class_labels():
    rng = np.random.default_rng(3)
    n = 60
    y = (rng.random((n, 4)) < 0.4).astype(float)
    y[:, 3] = 1.0  # single-class label: no AUC
    scores = np.round(np.clip(y * 0.35 + rng.random((n, 4)) * 0.65, 0, 1), 1)
    values = multilabel_auc(y, scores, average="none")
    ref = [mann_whitney_auc(scores[y[:, j] == 1, j], scores[y[:, j] == 0, j]) for j in range(3)]
    np.testing.assert_allclose(values[:3], ref, atol=1e-12)
    assert math.isnan(values[3])
    assert multilabel_auc(y, scores) == pytest.approx(np.mean(ref), abs=1e-12)
    assert math.isnan(multilabel_auc(np.ones((5, 2)), np.random.rand(5, 2)))  # no label has an AUC


def test_per_class_auc_rejects_bad_targets():
    with pytest.raises(ValueError, match="0/1"):
        per_class_auc(np.array([[0.0, 2.0]]), np.array([[0.1, 0.9]]))
    with pytest.raises(ValueError, match="same shape"):
        per_class_auc(np.zeros((3, 2)), np.zeros((3, 3)))


def test_balanced_accuracy_and_confusion_matrix_vs_loops(multiclass_data):
    y, probs = multiclass_data
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, 4, len(y)))
    assert balanced_accuracy(y, pred) == pytest.approx(ref_balanced_accuracy(y.tolist(), pred.tolist()))
    np.testing.assert_array_equal(confusion_matrix(y, pred, 4), ref_confusion(y.tolist(), pred.tolist(), 4))
    # scores are arg-maxed
    arg = probs.argmax(1)
    np.testing.assert_array_equal(confusion_matrix(y, probs), ref_confusion(y.tolist(), arg.tolist(), 4))
    assert accuracy(y, probs) == pytest.approx(np.mean(arg == y))


def test_balanced_accuracy_closed_case_and_absent_class():
    y_true = [0, 0, 1, 1, 1, 1]
    y_pred = [0, 1, 1, 1, 1, 2]  # class 2 never occurs in y_true: excluded from the mean, not a 0 recall
    assert balanced_accuracy(y_true, y_pred, num_classes=3) == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # imbalance: predicting the majority everywhere is 0.5 balanced but 0.9 plain accuracy
    y = [0] * 9 + [1]
    assert balanced_accuracy(y, [0] * 10) == pytest.approx(0.5)
    assert accuracy(y, [0] * 10) == pytest.approx(0.9)


def test_metric_name_sanitises():
    assert metric_name("auc", "basal cell/carcinoma") == "auc_basal_cell_carcinoma"
    assert metric_name("auc", "nv") == "auc_nv"


# ---------------------------------------------------------------------------------------------- ignite
def _engine(y, probs, batch=16, decollate=True):
    """An engine whose output looks like a MONAI evaluator's (decollated list of per-item dicts)."""
    y_t, p_t = torch.as_tensor(y), torch.as_tensor(probs, dtype=torch.float32)
    batches = [(p_t[i : i + batch], y_t[i : i + batch]) for i in range(0, len(y_t), batch)]

    def step(engine, b):
        p, t = b
        if decollate:
            return [{"pred": p[i], "label": t[i]} for i in range(len(t))]
        return {"pred": p, "label": t}

    return Engine(step), batches


@pytest.mark.parametrize("decollate", [True, False])
def test_attached_metrics_match_references(multiclass_data, decollate):
    y, probs = multiclass_data
    engine, batches = _engine(y, probs, decollate=decollate)
    names = ["akiec", "bcc", "bkl", "df"]
    attach_classification_metrics(engine, 4, class_names=names)
    engine.run(batches)
    m = engine.state.metrics
    assert set(m) == {"accuracy", "balanced_accuracy", "auc_macro", *(f"auc_{c}" for c in names)}
    arg = probs.argmax(1)
    ref = [ref_ovr_auc(y.tolist(), probs.tolist(), c) for c in range(4)]
    assert m["accuracy"] == pytest.approx(np.mean(arg == y))
    assert m["balanced_accuracy"] == pytest.approx(ref_balanced_accuracy(y.tolist(), arg.tolist()))
    assert m["auc_macro"] == pytest.approx(np.mean(ref), abs=1e-6)
    for c, name in enumerate(names):
        assert m[f"auc_{name}"] == pytest.approx(ref[c], abs=1e-6)
    # a second run resets the accumulators (otherwise counts would double and the AUC mix two runs)
    engine.run(batches[:2])
    n2 = sum(len(b[1]) for b in batches[:2])
    assert engine.state.metrics["accuracy"] == pytest.approx(np.mean(arg[:n2] == y[:n2]))


def test_attached_metrics_multilabel():
    rng = np.random.default_rng(5)
    y = (rng.random((40, 3)) < 0.5).astype(np.float32)
    y[:, 2] = 0.0  # no positives: skipped
    scores = np.clip(y * 0.3 + rng.random((40, 3)) * 0.7, 0, 1).astype(np.float32)
    engine, batches = _engine(y, scores, batch=8)
    attach_classification_metrics(engine, 3, multi_label=True, class_names=["a", "b", "c"])
    engine.run(batches)
    m = engine.state.metrics
    assert set(m) == {"auc_macro", "auc_a", "auc_b", "auc_c"}
    ref = [mann_whitney_auc(scores[y[:, j] == 1, j], scores[y[:, j] == 0, j]) for j in range(2)]
    assert m["auc_a"] == pytest.approx(ref[0], abs=1e-6)
    assert m["auc_b"] == pytest.approx(ref[1], abs=1e-6)
    assert math.isnan(m["auc_c"])
    assert m["auc_macro"] == pytest.approx(np.mean(ref), abs=1e-6)


def test_classification_metrics_checks_names():
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="twice"):
        classification_metrics(2, class_names=["a b", "a/b"])


def test_labels_follow_the_preds_device() -> None:
    """On a GPU the evaluator's preds sit on the GPU while decollated labels may be on the CPU; Ignite's
    Accuracy compares them elementwise, so the labels are moved to the preds' device (a 'meta' device stands
    in for the GPU here)."""
    for multi_label, label in ((False, torch.tensor([0, 1, 2])), (True, torch.eye(3)[:, :2].T.reshape(3, 2))):
        pred, y = ignite_pred_label(lambda out: out, multi_label)((torch.zeros(3, 2 if multi_label else 4,
                                                                                device="meta"), label))
        assert pred.device == y.device == torch.device("meta")
