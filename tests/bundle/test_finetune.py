"""Fine-tuning engines on synthetic data, label handling, class weights, and label fractions on HAM10000."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.handlers import from_engine
from PIL import Image

from medssl_monai.bundle import build_finetune
from medssl_monai.data import EncodeLabeld, LabelEncoder, select_labelled
from medssl_monai.losses import class_weights
from medssl_monai.metrics import (
    accuracy,
    balanced_accuracy,
    confusion_matrix,
    multilabel_auc,
    roc_auc_ovr,
)
from medssl_monai.networks import get_backbone
from medssl_monai.networks.heads import Classifier, ProjectionHead


# ---------------------------------------------------------------------------------------------- helpers
def separable(counts, seed, offset=1.0, noise=0.5):
    """Class c: noise everywhere plus ``offset`` on channel c, so the per-channel mean tells the class."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for c, n in enumerate(counts):
        for _ in range(n):
            img = torch.randn(3, 16, 16, generator=g) * noise
            img[c] += offset
            items.append({"image": img, "label": c})
    return items


def loader(items, batch_size=16, shuffle=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(Dataset(items), batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)


def tiny_classifier(num_classes, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Classifier(get_backbone("cbr_tiny", in_channels=3), num_classes, **kwargs)


class Recorder:
    """Per evaluation: the evaluator's (post-processed) predictions, labels and metrics."""

    def __init__(self, evaluator):
        self.runs: list[dict] = []
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        evaluator.add_event_handler(Events.STARTED, self._start)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        evaluator.add_event_handler(Events.COMPLETED, self._done)

    def _start(self, _):
        self._preds, self._labels = [], []

    def _collect(self, engine):
        preds, labels = from_engine(["pred", "label"])(engine.state.output)
        self._preds += [torch.as_tensor(p).as_subclass(torch.Tensor).clone() for p in preds]
        self._labels += [torch.as_tensor(y).as_subclass(torch.Tensor).clone() for y in labels]

    def _done(self, engine):
        self.runs.append({"pred": torch.stack(self._preds), "label": torch.stack(self._labels),
                          "metrics": dict(engine.state.metrics)})


def logits_of(network, items):
    network.eval()
    with torch.no_grad():
        return network(torch.stack([d["image"] for d in items]))


# ---------------------------------------------------------------------------------------------- engines
def test_finetune_learns_separable_classes_and_metrics_agree(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    train = separable([32, 32, 32], seed=0)
    val = separable([8, 16, 24], seed=1)  # imbalanced: balanced accuracy differs from accuracy
    net = tiny_classifier(3)
    writer = SummaryWriter(str(tmp_path / "tb"))
    trainer, evaluator = build_finetune(
        net, loader(train, shuffle=True), loader(val), 3, lr=0.05, max_epochs=4, output_dir=tmp_path / "out",
        class_names=["a", "b", "c"], summary_writer=writer,
    )
    rec = Recorder(evaluator)
    evaluator.run()  # the untrained network: metrics far from perfect, a real test of the agreement below
    trainer.run()
    writer.close()

    assert len(rec.runs) == 1 + 4  # once by hand, then every epoch (val_interval=1)
    final = rec.runs[-1]["metrics"]
    assert final["balanced_accuracy"] > 0.9
    assert rec.runs[0]["metrics"]["balanced_accuracy"] < 0.9

    for run in rec.runs:
        pred, label, m = run["pred"], run["label"], run["metrics"]
        assert set(m) == {"accuracy", "balanced_accuracy", "auc_macro", "auc_a", "auc_b", "auc_c"}
        torch.testing.assert_close(pred.sum(1), torch.ones(len(pred)))  # softmax post-transform
        assert m["accuracy"] == pytest.approx(accuracy(label, pred), abs=1e-6)
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy(label, pred), abs=1e-6)
        assert m["auc_macro"] == pytest.approx(roc_auc_ovr(label, pred), abs=1e-6)
        per_class = roc_auc_ovr(label, pred, average="none")
        for c, name in enumerate("abc"):
            assert m[f"auc_{name}"] == pytest.approx(per_class[c], abs=1e-6)

    # the evaluator's predictions are softmax(network(image)) on the validation images, in order
    expected = torch.softmax(logits_of(net, val), dim=1)
    torch.testing.assert_close(rec.runs[-1]["pred"], expected, atol=1e-5, rtol=1e-4)
    assert rec.runs[-1]["label"].tolist() == [d["label"] for d in val]

    assert evaluator.state.key_metric_name == "auc_macro"
    assert evaluator.state.best_metric == pytest.approx(max(r["metrics"]["auc_macro"] for r in rec.runs))

    # confusion-matrix files of the last evaluation
    cm = confusion_matrix(rec.runs[-1]["label"], rec.runs[-1]["pred"], 3)
    df = pd.read_csv(tmp_path / "out" / "confusion_matrix.csv", index_col=0)
    assert list(df.index) == ["a", "b", "c"] and list(df.columns) == ["a", "b", "c"]
    np.testing.assert_array_equal(df.to_numpy(), cm)
    assert df.to_numpy().sum(axis=1).tolist() == [8, 16, 24]
    with Image.open(tmp_path / "out" / "confusion_matrix.png") as im:
        assert im.format == "PNG" and min(im.size) > 100

    # TensorBoard: training loss per iteration, validation metrics per epoch
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "balanced_accuracy", "auc_macro", "auc_a"} <= tags
    assert [e.step for e in acc.Scalars("balanced_accuracy")][-4:] == [1, 2, 3, 4]
    assert len(acc.Scalars("train_loss")) == 4 * 6
    lrs = [e.value for e in acc.Scalars("lr")]  # cosine schedule per epoch: starts at lr, then decreases
    assert len(lrs) == 4 and lrs[0] > lrs[1] > lrs[2] > lrs[3] > 0


def test_linear_probe_freezes_backbone_and_trains_head():
    head = ProjectionHead(512, out_features=32, num_layers=2)
    net = tiny_classifier(3, keep_projection_layers=1, projection_head=head)
    frozen_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head.")}
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    items = separable([8, 8, 8], seed=2)
    trainer, _ = build_finetune(net, loader(items, 8, shuffle=True), loader(items, 24), 3, linear_probe=True,
                                lr=0.1, max_epochs=2)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in net.head.parameters()}
    trainer.run()

    after = net.state_dict()
    assert any(k.startswith("projection_head.") for k in frozen_before)
    for k, v in frozen_before.items():  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(after[k], v), k
    assert all(not p.requires_grad for p in net.backbone.parameters())
    changed = [k for k, v in net.head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert sorted(changed) == ["fc.bias", "fc.weight"]

    # full fine-tuning afterwards unfreezes the backbone again
    trainer, _ = build_finetune(net, loader(items, 8), loader(items, 24), 3, lr=0.1, max_epochs=1)
    assert not net.backbone_frozen
    trainer.run()
    assert not torch.equal(net.state_dict()["backbone.block1.cbr.conv.weight"],
                           frozen_before["backbone.block1.cbr.conv.weight"])


# ---------------------------------------------------------------------------------------------- weights
def test_class_weights_modes():
    labels = [0] * 10 + [1] * 30 + [2] * 60
    w = class_weights(labels, 3, "inverse")
    torch.testing.assert_close(w, torch.tensor([2.0, 2 / 3, 1 / 3]))  # ∝ 1/n, mean 1
    assert w.mean().item() == pytest.approx(1.0)

    beta = 0.99
    eff = [sum(beta**k for k in range(n)) for n in (10, 30, 60)]  # effective number as a geometric series
    ref = torch.tensor([1 / e for e in eff])
    torch.testing.assert_close(class_weights(labels, 3, "effective", beta=beta), ref * 3 / ref.sum())
    # beta = 0: every class has effective number 1, i.e. no re-weighting
    torch.testing.assert_close(class_weights(labels, 3, "effective", beta=0.0), torch.ones(3))
    torch.testing.assert_close(class_weights(labels, 3, "none"), torch.ones(3))

    # a class without labels: weight 0, the others keep mean 1
    w = class_weights([0, 0, 0, 2], 3, "inverse")
    assert w[1] == 0 and w[[0, 2]].mean().item() == pytest.approx(1.0) and w[2] == pytest.approx(3 * w[0])

    # multi-label: pos_weight = negatives / positives; a label that is never positive gets 1
    y = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(class_weights(y, 3, "inverse"), torch.tensor([3.0, 1 / 3, 1.0]))
    with pytest.raises(ValueError, match="mode"):
        class_weights(labels, 3, "sqrt")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_weights([0, 3], 3)


def test_weighted_loss_emphasises_the_rare_class():
    train = separable([36, 4], seed=3, offset=0.0, noise=1.0)  # pure noise, 9:1
    trainer, _ = build_finetune(tiny_classifier(2), loader(train), loader(train), 2, max_epochs=1)
    loss = trainer.loss_function
    assert isinstance(loss, nn.CrossEntropyLoss)
    torch.testing.assert_close(loss.weight, torch.tensor([0.2, 1.8]))  # from the dataset's labels

    # a mistake on the rare class costs more than the same mistake on the frequent one
    target = torch.tensor([0, 1])
    wrong_on_rare = loss(torch.tensor([[3.0, 0.0], [3.0, 0.0]]), target)
    wrong_on_frequent = loss(torch.tensor([[0.0, 3.0], [0.0, 3.0]]), target)
    nll_wrong, nll_right = math.log(1 + math.exp(3)), math.log(1 + math.exp(-3))
    assert wrong_on_rare.item() == pytest.approx((0.2 * nll_right + 1.8 * nll_wrong) / 2.0, rel=1e-5)
    assert wrong_on_frequent.item() == pytest.approx((0.2 * nll_wrong + 1.8 * nll_right) / 2.0, rel=1e-5)
    # (N, 1) float targets (channel-first label pipelines) are read as class indices
    assert loss(torch.tensor([[3.0, 0.0], [3.0, 0.0]]), target[:, None].float()).item() == pytest.approx(
        wrong_on_rare.item())

    # trained on labels unrelated to the images, the weighted probe leans much more to the rare class
    val = separable([20, 20], seed=4, offset=0.0, noise=1.0)
    p_rare = {}
    for mode in ("none", "inverse"):
        net = tiny_classifier(2, seed=1)
        trainer, evaluator = build_finetune(net, loader(train, 8, shuffle=True), loader(val, 40), 2,
                                            class_weight_mode=mode, linear_probe=True, lr=0.05, max_epochs=6)
        rec = Recorder(evaluator)
        trainer.run()
        p_rare[mode] = rec.runs[-1]["pred"][:, 1].mean().item()
    assert p_rare["inverse"] > p_rare["none"] + 0.15, p_rare


def test_multilabel_path(tmp_path):
    g = torch.Generator().manual_seed(5)
    def make(n):
        y = (torch.rand(n, 3, generator=g) < 0.4).float()
        x = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + y[:, :, None, None]
        return [{"image": x[i], "label": y[i]} for i in range(n)]

    train, val = make(64), make(32)
    net = tiny_classifier(3)
    trainer, evaluator = build_finetune(
        net, loader(train, shuffle=True), loader(val), 3, multi_label=True, lr=0.05, max_epochs=4,
        class_names=["x", "y", "z"], output_dir=tmp_path,
    )
    y_train = torch.stack([d["label"] for d in train])
    pos = y_train.sum(0)
    loss = trainer.loss_function
    assert isinstance(loss, nn.BCEWithLogitsLoss)
    torch.testing.assert_close(loss.pos_weight, (len(train) - pos) / pos)
    rec = Recorder(evaluator)
    trainer.run()

    run = rec.runs[-1]
    assert set(run["metrics"]) == {"auc_macro", "auc_x", "auc_y", "auc_z"}
    torch.testing.assert_close(run["pred"], torch.sigmoid(logits_of(net, val)), atol=1e-5, rtol=1e-4)
    assert run["metrics"]["auc_macro"] == pytest.approx(multilabel_auc(run["label"], run["pred"]), abs=1e-6)
    assert run["metrics"]["auc_macro"] > 0.8
    assert not (tmp_path / "confusion_matrix.csv").exists()  # no confusion matrix for multi-label


def test_build_finetune_validates_inputs(caplog):
    items = separable([4, 4], seed=6)
    with caplog.at_level(logging.WARNING, logger="medssl_monai.engines.amp"):
        trainer, evaluator = build_finetune(tiny_classifier(2), loader(items), loader(items), 2, amp=True)
    assert not trainer.amp and not evaluator.amp and "amp=True is ignored" in caplog.text  # CPU
    with pytest.raises(ValueError, match="outputs"):
        build_finetune(tiny_classifier(3), loader(items), loader(items), 2)
    with pytest.raises(ValueError, match="key_metric"):
        build_finetune(tiny_classifier(2), loader(items), loader(items), 2, key_metric="f1")
    raw = [{"image": d["image"], "label": str(d["label"])} for d in items]  # not yet encoded
    with pytest.raises(ValueError, match="train_labels"):
        build_finetune(tiny_classifier(2), loader(raw), loader(raw), 2)
    trainer, _ = build_finetune(tiny_classifier(2), loader(raw), loader(raw), 2, train_labels=[0, 0, 0, 1])
    torch.testing.assert_close(trainer.loss_function.weight, torch.tensor([0.5, 1.5]))


# ---------------------------------------------------------------------------------------------- labels
def test_label_encoder_multiclass():
    enc = LabelEncoder().fit(["nv", "mel", None, "bkl", "nv", float("nan")])
    assert enc.classes == ["bkl", "mel", "nv"]
    assert LabelEncoder().fit(["bkl", "nv", "mel"]).classes == enc.classes  # order-independent
    assert enc.encode("mel") == 1 and enc.decode(2) == "nv"
    torch.testing.assert_close(enc.encode_many(["nv", "bkl"]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="'vasc'"):
        enc.encode("vasc")
    with pytest.raises(ValueError, match="missing"):
        enc.encode(None)
    with pytest.raises(ValueError, match="vasc"):
        LabelEncoder(["mel", "nv"]).fit(["mel", "vasc"])
    with pytest.raises(RuntimeError, match="not fitted"):
        LabelEncoder().encode("nv")

    fixed = LabelEncoder(["nv", "mel", "bkl"])  # imposed order is kept
    assert fixed.encode("nv") == 0
    restored = LabelEncoder.from_state_dict(fixed.state_dict())
    assert restored.classes == ["nv", "mel", "bkl"] and restored.encode("bkl") == 2

    out = EncodeLabeld("label", enc)({"label": "bkl", "path": "x.jpg"})
    assert out == {"label": 0, "path": "x.jpg"}


def test_label_encoder_multilabel():
    enc = LabelEncoder(multi_label=True).fit(["Effusion|Mass", "Atelectasis", "", "Mass"])
    assert enc.classes == ["Atelectasis", "Effusion", "Mass"]
    torch.testing.assert_close(enc.encode("Mass | Effusion"), torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(enc.encode(""), torch.zeros(3))
    assert enc.decode(torch.tensor([1.0, 0.0, 1.0])) == ["Atelectasis", "Mass"]
    assert enc.encode_many(["Mass", "Atelectasis"]).shape == (2, 3)
    with pytest.raises(ValueError, match="'Hernia'"):
        enc.encode("Mass|Hernia")
    restored = LabelEncoder.from_state_dict(enc.state_dict())
    assert restored.multi_label and restored.classes == enc.classes


# ---------------------------------------------------------------------------------------------- fractions
def test_select_labelled_on_ham10000(ham10000, caplog):
    from medssl_monai.data import table_to_manifest

    df = table_to_manifest(ham10000 / "metadata.csv", group_col="lesion_id", label_col="dx",
                           instance_col="image_id")
    train = df[df["split"] == "train"]
    ten = select_labelled(df, 0.1)
    assert len(ten) == 719
    assert ten.index.equals(df.index[df["labeled_10pct"] & (df["split"] == "train")])
    twenty = select_labelled(df, 0.2)
    assert set(ten.index) < set(twenty.index)
    full = select_labelled(df, 1.0)
    assert len(full) == len(train) == 7023
    assert set(full["split"]) == {"train"}

    # no shipped 5% column: drawn by group, stratified, nested, reproducible
    five = select_labelled(df, 0.05, seed=0)
    assert set(five.index) <= set(train.index)
    lesions = set(five["patient_id"])
    assert len(five) == train["patient_id"].isin(lesions).sum()  # whole lesions only
    assert set(five["label"]) == set(train["label"])  # every class kept
    assert 0.03 < len(lesions) / train["patient_id"].nunique() < 0.07
    assert five.index.equals(select_labelled(df, 0.05, seed=0).index)
    assert not five.index.equals(select_labelled(df, 0.05, seed=1).index)
    drawn_ten = select_labelled(df.drop(columns=["labeled_10pct"]), 0.1, seed=0)
    assert set(five.index) <= set(drawn_ten.index)

    # a shipped column read back from CSV as text works the same way
    as_text = df.assign(labeled_10pct=df["labeled_10pct"].map({True: "True", False: "False"}))
    assert select_labelled(as_text, 0.1).index.equals(ten.index)

    # unlabelled training rows are dropped and counted in the log
    unlabelled = df.copy()
    unlabelled.loc[train.index[:25], "label"] = pd.NA
    with caplog.at_level(logging.INFO, logger="medssl_monai.data.splits"):
        kept = select_labelled(unlabelled, 1.0)
    assert len(kept) == 7023 - 25
    assert "dropped 25 training row(s) without a label" in caplog.text
    with pytest.raises(ValueError, match="label_fraction"):
        select_labelled(df, 0.0)


def test_build_finetune_amp_takes_the_bundles_vocabulary(caplog):
    """``amp`` is ``null|bf16|fp16`` in every bundle: the string "none" must not switch mixed precision on."""
    from medssl_monai.engines import amp_dtype

    assert amp_dtype(None) is None and amp_dtype(False) is None and amp_dtype("none") is None
    assert amp_dtype(True) == torch.float16 and amp_dtype("fp16") == torch.float16
    assert amp_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="amp"):
        amp_dtype("fp8")
    items = separable([4, 4], seed=6)
    with caplog.at_level(logging.WARNING, logger="medssl_monai.engines.amp"):
        trainer, _ = build_finetune(tiny_classifier(2), loader(items), loader(items), 2, amp="none")
    assert not trainer.amp and "ignored" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="medssl_monai.engines.amp"):
        trainer, _ = build_finetune(tiny_classifier(2), loader(items), loader(items), 2, amp="bf16")
    assert not trainer.amp and "amp=bf16 is ignored" in caplog.text  # CPU


def test_finetune_flips_follow_the_preset():
    """The shipped train.json's augmentation: the view preset sets the flips (laterality is a cue in radiographs)."""
    from monai.bundle import ConfigParser
    from monai.transforms import RandFlipd

    from medssl_monai.bundle.locate import bundle_path

    def flips(preset):
        parser = ConfigParser()
        parser.read_config(str(bundle_path("finetune_classification") / "configs" / "train.json"))
        parser.update({"preset": preset, "classes": ["x"]})
        pre = parser.get_parsed_content("train#preprocessing")
        return sorted((t.flipper.spatial_axis, t.prob) for t in pre.transforms if isinstance(t, RandFlipd))

    assert flips(None) == [(1, 0.5)]  # unchanged default: horizontal flips
    assert flips("chest_xray") == []  # laterality is a cue in radiographs
    assert flips("dermatology") == [(0, 0.5), (1, 0.5)]


def test_resumed_finetune_keeps_the_best_metric(tmp_path):
    """The evaluator's best key metric travels in the checkpoint: a resumed run does not restart it at -1."""
    train, val = separable([16, 16, 16], seed=0), separable([8, 8, 8], seed=1)

    def build(max_epochs):
        net = tiny_classifier(3)
        return build_finetune(net, loader(train, shuffle=True), loader(val), 3, lr=0.05, max_epochs=max_epochs,
                              checkpoint_dir=tmp_path / "ckpt", resume=True)

    trainer, evaluator = build(2)
    rec = Recorder(evaluator)
    trainer.run()
    best, best_epoch = evaluator.state.best_metric, evaluator.state.best_metric_epoch
    assert best == pytest.approx(max(r["metrics"]["auc_macro"] for r in rec.runs)) and best_epoch in (1, 2)

    trainer2, evaluator2 = build(2)  # a fresh process would build these again, then resume the finished run
    assert evaluator2.state.best_metric == -1
    trainer2.run()
    assert trainer2.state.epoch == 2
    assert evaluator2.state.best_metric == pytest.approx(best)
    assert evaluator2.state.best_metric_epoch == best_epoch

    # a checkpoint written before the best metric was saved still resumes (kept as initialised, with a warning)
    from medssl_monai.handlers.checkpoint import latest_checkpoint

    path = latest_checkpoint(tmp_path / "ckpt")
    state = torch.load(path, weights_only=True)
    del state["evaluator_best"]
    torch.save(state, path)
    trainer3, evaluator3 = build(3)
    trainer3.run()
    assert trainer3.state.epoch == 3 and evaluator3.state.best_metric_epoch == 3
