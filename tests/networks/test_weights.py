"""Weight transfer: full / first_k / mean_var loading and torchvision ResNet import."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import ResNet

from medssl_monai.networks import (
    Classifier,
    ProjectionHead,
    SSLModel,
    TransferReport,
    WeightTransferError,
    extract_state_dict,
    get_backbone,
    import_torchvision_resnet,
    load_backbone_weights,
    map_torchvision_resnet_key,
    stage_keys,
)


def randomize_bn_(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN affine params and running stats, so eval outputs depend on every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def small_cbr(**kwargs) -> nn.Module:
    return get_backbone("cbr_small", **{"channels": (8, 16, 16, 32), **kwargs})


# ------------------------------------------------------------------ full


def test_full_round_trip_from_ssl_checkpoint_file(tmp_path):
    source = randomize_bn_(small_cbr(), 0)
    ssl = SSLModel(source, ProjectionHead(32, out_features=8))
    path = tmp_path / "ssl.pt"
    torch.save({"model": ssl.state_dict(), "optimizer": {"lr": 0.1}, "epoch": 3}, path)

    target = small_cbr()
    report = load_backbone_weights(target, path)
    assert isinstance(report, TransferReport) and report.ok
    assert report.prefix == "backbone."
    assert report.loaded == list(source.state_dict())
    assert not (report.missing or report.unexpected or report.mismatched or report.untouched)
    assert all(k.startswith("projection_head.") for k in report.skipped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source.eval()(x))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
        # Lightning-style nesting
        lambda sd: {"state_dict": {f"model.encoder.{k}": v for k, v in sd.items()}},
        lambda sd: {"backbone": sd, "head": {"w": torch.zeros(1)}},
    ],
)
def test_full_load_accepts_checkpoint_layouts(wrap):
    source = randomize_bn_(get_backbone("resnet18"), 1)
    target = get_backbone("resnet18")
    report = load_backbone_weights(target, wrap(source.state_dict()))
    assert report.ok and len(report.loaded) == len(source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_full_load_from_classifier_module_and_explicit_prefix():
    source = randomize_bn_(small_cbr(), 2)
    clf = Classifier(source, num_classes=2)
    target = small_cbr()
    report = load_backbone_weights(target, clf)  # a module works as the checkpoint too
    assert report.ok and report.skipped == ["head.fc.weight", "head.fc.bias"]
    with pytest.raises(WeightTransferError):
        load_backbone_weights(small_cbr(), clf.state_dict(), prefix="")  # keys kept as they are: none match


def test_full_load_of_plain_monai_resnet_with_fc():
    monai_resnet = ResNet(
        "basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, conv1_t_stride=2,
        shortcut_type="B", bias_downsample=False, num_classes=10,
    )  # fmt: skip
    target = get_backbone("resnet18")
    with pytest.raises(WeightTransferError, match=r"fc\.weight"):
        load_backbone_weights(target, monai_resnet)
    report = load_backbone_weights(target, monai_resnet, ignore=("fc.*",))
    assert report.ok and report.skipped == ["fc.weight", "fc.bias"]
    assert torch.equal(target.layer4[1].conv2.weight, monai_resnet.layer4[1].conv2.weight)


def test_missing_mismatched_unexpected_reported_and_strict_raises():
    source = small_cbr().state_dict()
    del source["block1.cbr.adn.N.running_var"]
    source["block2.cbr.conv.weight"] = torch.zeros(16, 8, 3, 3)
    source["extra.weight"] = torch.zeros(3)
    target = small_cbr()
    before = snapshot(target)
    with pytest.raises(WeightTransferError) as err:
        load_backbone_weights(target, source)
    message = str(err.value)
    for key in ("block1.cbr.adn.N.running_var", "block2.cbr.conv.weight", "extra.weight"):
        assert key in message
    assert "(16, 8, 3, 3)" in message and "(16, 8, 7, 7)" in message
    for k, v in target.state_dict().items():  # a failed strict load writes nothing
        assert torch.equal(v, before[k]), k

    report = err.value.report
    assert report.missing == ["block1.cbr.adn.N.running_var"]
    assert report.mismatched == {"block2.cbr.conv.weight": ((16, 8, 3, 3), (16, 8, 7, 7))}
    assert report.unexpected == ["extra.weight"]


def test_non_strict_loads_the_rest_and_warns(caplog):
    source = randomize_bn_(small_cbr(), 3).state_dict()
    source["block2.cbr.conv.weight"] = torch.zeros(16, 8, 3, 3)
    target = small_cbr()
    before = target.block2.cbr.conv.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="medssl_monai.networks.weights.transfer"):
        report = load_backbone_weights(target, source, strict=False)
    assert not report.ok and "block2.cbr.conv.weight" in caplog.text
    assert torch.equal(target.block2.cbr.conv.weight, before)
    assert torch.equal(target.block3.cbr.conv.weight, source["block3.cbr.conv.weight"])
    assert len(report.loaded) == len(source) - 1


# ------------------------------------------------------------------ first_k


def test_stage_keys_follow_monai_names():
    groups = stage_keys(get_backbone("resnet18"))
    assert list(groups) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert all(k.startswith(("conv1.", "bn1.")) for k in groups["stem"]) and len(groups["stem"]) == 6
    for i in range(1, 5):
        assert groups[f"layer{i}"] and all(k.startswith(f"layer{i}.") for k in groups[f"layer{i}"])
    assert sum(map(len, groups.values())) == len(get_backbone("resnet18").state_dict())


@pytest.mark.parametrize(
    "name, k, reused_prefixes",
    [
        ("resnet18", 2, ("conv1.", "bn1.", "layer1.")),  # stem + layer1
        ("cbr_large_t", 3, ("block1.", "block2.", "block3.")),
    ],
)
def test_first_k_copies_exactly_the_first_k_stages(name, k, reused_prefixes):
    source = randomize_bn_(get_backbone(name), 4)
    target = get_backbone(name)
    before = snapshot(target)
    ssl_checkpoint = SSLModel(source, ProjectionHead(source.feature_dim, out_features=4)).state_dict()
    report = load_backbone_weights(target, ssl_checkpoint, mode="first_k", k=k)
    assert report.ok and report.stages == target.stage_names[:k]
    src = source.state_dict()
    reused = [key for key in src if key.startswith(reused_prefixes)]
    assert report.loaded == reused
    assert sorted(report.untouched) == sorted(set(src) - set(reused))
    for key, value in target.state_dict().items():
        expected = src[key] if key.startswith(reused_prefixes) else before[key]
        assert torch.equal(value, expected), key


def test_first_k_with_slimmed_top():
    source = randomize_bn_(get_backbone("cbr_large_w"), 5)
    slim = get_backbone("cbr_large_w", channels=(64, 128, 64, 32))
    before = snapshot(slim)
    report = load_backbone_weights(slim, source.state_dict(), mode="first_k", k=2)
    assert report.ok and report.stages == ["block1", "block2"]
    for key, value in slim.state_dict().items():
        expected = source.state_dict()[key] if key.startswith(("block1.", "block2.")) else before[key]
        assert torch.equal(value, expected), key
    assert slim(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    # the checkpoint's wider upper stages are skipped, not reported as problems
    assert all(k.startswith(("block3.", "block4.")) for k in report.skipped)
    with pytest.raises(WeightTransferError, match=r"block3\.cbr\.conv\.weight"):
        load_backbone_weights(slim, source.state_dict(), mode="first_k", k=3)
    with pytest.raises(WeightTransferError, match="block4"):
        load_backbone_weights(slim, source.state_dict())


def test_first_k_with_slimmed_resnet_top():
    source = randomize_bn_(get_backbone("resnet18"), 10)
    slim = get_backbone("resnet18", block_inplanes=(64, 128, 64, 32))
    assert slim.feature_dim == 32
    report = load_backbone_weights(slim, source, mode="first_k", k=3)  # stem, layer1, layer2
    assert report.ok and report.stages == ["stem", "layer1", "layer2"]
    assert torch.equal(slim.layer2[1].conv2.weight, source.layer2[1].conv2.weight)
    assert all(k.startswith(("layer3.", "layer4.")) for k in report.untouched)


def test_first_k_reports_unknown_keys_inside_reused_stages():
    source = small_cbr().state_dict()
    source["block1.cbr.conv.bias"] = torch.zeros(8)  # trained with a conv bias the target lacks: a problem
    source["block3.cbr.conv.bias"] = torch.zeros(16)  # beyond k: deliberately not used
    source["layer1.0.conv1.weight"] = torch.zeros(1)  # belongs to no stage of this backbone
    target = small_cbr()
    before = snapshot(target)
    with pytest.raises(WeightTransferError, match=r"block1\.cbr\.conv\.bias"):
        load_backbone_weights(target, source, mode="first_k", k=2)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    report = load_backbone_weights(target, source, mode="first_k", k=2, strict=False)
    assert report.unexpected == ["block1.cbr.conv.bias"]
    assert {"block3.cbr.conv.bias", "layer1.0.conv1.weight"} <= set(report.skipped)
    # the same holds for the ResNet stem, a view over MONAI's conv1/bn1 rather than a submodule
    resnet = get_backbone("resnet18").state_dict()
    resnet["conv1.bias"] = torch.zeros(64)
    report = load_backbone_weights(get_backbone("resnet18"), resnet, mode="first_k", k=1, strict=False)
    assert report.unexpected == ["conv1.bias"]


def test_first_k_argument_checks():
    model = small_cbr()
    with pytest.raises(ValueError, match="needs k"):
        load_backbone_weights(model, model.state_dict(), mode="first_k")
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        load_backbone_weights(model, model.state_dict(), mode="first_k", k=5)
    with pytest.raises(ValueError, match="mode"):
        load_backbone_weights(model, model.state_dict(), mode="partial")


# ------------------------------------------------------------------ mean_var


def distinct_source(seed: int) -> nn.Module:
    """Every parameter drawn with its own mean and std, so matching statistics is not a coincidence."""
    model = get_backbone("cbr_small", channels=(16, 32, 64, 64))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 + 0.01 * i) + (0.1 * i - 0.5))
    return randomize_bn_(model, seed)


def test_mean_var_matches_statistics_not_values():
    source = distinct_source(0)
    target = get_backbone("cbr_small", channels=(16, 32, 64, 64))
    before = snapshot(target)
    report = load_backbone_weights(target, source.state_dict(), mode="mean_var", seed=0)
    assert report.ok
    params = dict(source.named_parameters())
    assert report.loaded == list(params)
    src, dst = source.state_dict(), target.state_dict()
    checked = 0
    for key in params:
        assert not torch.equal(dst[key], src[key]), key
        if src[key].numel() >= 10_000:  # conv weights: sample statistics are reliable
            checked += 1
            assert abs(dst[key].mean() - src[key].mean()) < 0.05 * src[key].std(), key
            assert abs(dst[key].std() / src[key].std() - 1) < 0.05, key
    assert checked >= 3
    # buffers (BN running statistics) are not transferred: they describe the pretrained activations
    buffers = [k for k in dst if k not in params]
    assert buffers and sorted(report.untouched) == sorted(buffers)
    for key in buffers:
        assert torch.equal(dst[key], before[key]), key


def test_mean_var_is_deterministic():
    source = distinct_source(1).state_dict()

    def draw(**kwargs) -> dict[str, torch.Tensor]:
        model = get_backbone("cbr_small", channels=(16, 32, 64, 64))
        load_backbone_weights(model, source, mode="mean_var", **kwargs)
        return model.state_dict()

    a, b = draw(seed=123), draw(generator=torch.Generator().manual_seed(123))
    c = draw(seed=124)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["block1.cbr.conv.weight"], c["block1.cbr.conv.weight"])


def test_mean_var_copies_scalars_and_can_be_limited_to_k_stages():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.5))
            self.lin = nn.Linear(64, 64)

    source, target = Scaled(), Scaled()
    torch.nn.init.constant_(source.scale, 3.25)
    load_backbone_weights(target, source, mode="mean_var", seed=0)
    assert target.scale.item() == 3.25
    assert not torch.equal(target.lin.weight, source.lin.weight)

    model = get_backbone("cbr_small", channels=(16, 32, 8, 8))  # slimmed top: out of scope for k=1
    before = snapshot(model)
    report = load_backbone_weights(model, distinct_source(2), mode="mean_var", k=1, seed=0)
    assert report.ok and report.stages == ["block1"]
    assert report.loaded == ["block1.cbr.conv.weight", "block1.cbr.adn.N.weight", "block1.cbr.adn.N.bias"]
    assert not torch.equal(model.block1.cbr.conv.weight, before["block1.cbr.conv.weight"])
    assert torch.equal(model.block2.cbr.conv.weight, before["block2.cbr.conv.weight"])


# ------------------------------------------------------------------ torchvision import


def torchvision_resnet_layout(block: str, layers: tuple[int, ...]) -> OrderedDict[str, tuple[int, ...]]:
    """Key -> shape of torchvision.models.ResNet's state dict, written out from its architecture."""
    expansion = 1 if block == "basic" else 4
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def bn(name: str, c: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), 1):
        for b in range(blocks):
            p = f"layer{i}.{b}"
            if block == "basic":
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            else:
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
            stride = 2 if (i > 1 and b == 0) else 1
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    shapes["fc.weight"] = (1000, 512 * expansion)
    shapes["fc.bias"] = (1000,)
    return shapes


# torchvision name -> MONAI name, written independently of medssl_monai's table (MONAI keeps torchvision's names)
def tv_to_monai(name: str) -> str:
    return name


def torchvision_state_dict(
    reference: nn.Module, block: str, layers: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    layout = torchvision_resnet_layout(block, layers)
    ref = reference.state_dict()
    assert {tv_to_monai(k) for k in layout if not k.startswith("fc.")} == set(ref)
    out = {}
    for name, shape in layout.items():
        out[name] = torch.randn(shape) if name.startswith("fc.") else ref[tv_to_monai(name)].clone()
        assert tuple(out[name].shape) == shape, name
    return out


@pytest.mark.parametrize(
    "name, block, layers", [("resnet18", "basic", (2, 2, 2, 2)), ("resnet50", "bottleneck", (3, 4, 6, 3))]
)
def test_import_torchvision_resnet_matches_original(name, block, layers, tmp_path):
    reference = randomize_bn_(get_backbone(name), 6).eval()
    tv = torchvision_state_dict(reference, block, layers)
    path = tmp_path / "tv.pth"
    torch.save(tv, path)
    target = get_backbone(name)
    report = import_torchvision_resnet(target, path)
    assert report.ok and report.skipped == ["fc.weight", "fc.bias"]
    assert len(report.loaded) == len(tv) - 2 and not report.untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), reference(x))


def test_import_torchvision_without_counters_with_unknown_key_and_moco_prefix():
    reference = randomize_bn_(get_backbone("resnet18"), 7)
    tv = torchvision_state_dict(reference, "basic", (2, 2, 2, 2))
    old = {k: v for k, v in tv.items() if not k.endswith("num_batches_tracked")}  # pre-1.0 torchvision files
    report = import_torchvision_resnet(get_backbone("resnet18"), old)
    assert report.ok and all(k.endswith("num_batches_tracked") for k in report.untouched)

    tv["layer1.0.se.fc1.weight"] = torch.zeros(4, 64)
    with pytest.raises(WeightTransferError, match=r"layer1\.0\.se\.fc1\.weight"):
        import_torchvision_resnet(get_backbone("resnet18"), tv)
    target = get_backbone("resnet18")
    report = import_torchvision_resnet(target, tv, strict=False)
    assert report.unexpected == ["layer1.0.se.fc1.weight"] and len(report.loaded) == len(tv) - 3
    assert torch.equal(target.layer3[0].downsample[0].weight, tv["layer3.0.downsample.0.weight"])

    # MoCo-style checkpoint: query encoder under "module.encoder_q.", an MLP fc, a key encoder to ignore
    del tv["layer1.0.se.fc1.weight"], tv["fc.weight"], tv["fc.bias"]
    moco = {f"module.encoder_q.{k}": v for k, v in tv.items()}
    moco.update(
        {
            "module.encoder_q.fc.0.weight": torch.zeros(2, 2),
            "module.encoder_k.conv1.weight": tv["conv1.weight"],
        }
    )
    report = import_torchvision_resnet(
        get_backbone("resnet18"), {"state_dict": moco, "epoch": 200, "arch": "resnet18"}
    )
    assert report.ok and report.prefix == "module.encoder_q."
    assert set(report.skipped) == {"module.encoder_q.fc.0.weight", "module.encoder_k.conv1.weight"}


def test_import_torchvision_adapts_rgb_stem_to_grayscale():
    reference = randomize_bn_(get_backbone("resnet18"), 8).eval()
    tv = torchvision_state_dict(reference, "basic", (2, 2, 2, 2))
    gray = get_backbone("resnet18", in_channels=1)
    report = import_torchvision_resnet(gray, tv)
    assert report.ok and report.adapted == ["conv1.weight"]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a grey image through the adapted stem == the RGB model on the grey image
        torch.testing.assert_close(gray.eval()(x), reference(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(WeightTransferError, match=r"conv1\.weight"):
        import_torchvision_resnet(get_backbone("resnet18", in_channels=1), tv, adapt_first_conv=False)


def test_import_torchvision_first_k_and_type_check():
    reference = randomize_bn_(get_backbone("resnet18"), 9)
    tv = torchvision_state_dict(reference, "basic", (2, 2, 2, 2))
    target = get_backbone("resnet18")
    before = snapshot(target)
    report = import_torchvision_resnet(target, tv, mode="first_k", k=1)
    assert report.stages == ["stem"] and torch.equal(target.conv1.weight, tv["conv1.weight"])
    assert torch.equal(target.layer1[0].conv1.weight, before["layer1.0.conv1.weight"])
    with pytest.raises(TypeError, match="ResNet"):
        import_torchvision_resnet(get_backbone("cbr_small"), tv)


def test_torchvision_key_mapping_and_extract_state_dict():
    assert (
        map_torchvision_resnet_key("layer2.0.downsample.1.running_var") == "layer2.0.downsample.1.running_var"
    )
    assert (
        map_torchvision_resnet_key("layer4.2.bn3.num_batches_tracked") == "layer4.2.bn3.num_batches_tracked"
    )
    assert map_torchvision_resnet_key("fc.weight") is None
    assert map_torchvision_resnet_key("layer5.0.conv1.weight") is None
    tensors, dropped = extract_state_dict({"model": {"a": torch.zeros(1), "meta": "x"}, "optimizer": {}})
    assert list(tensors) == ["a"] and dropped == ["meta"]
    with pytest.raises(ValueError, match="no tensors"):
        extract_state_dict({"epoch": 3})
    with pytest.raises(TypeError):
        extract_state_dict(3)
