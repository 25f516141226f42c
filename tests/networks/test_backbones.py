"""Backbone registry, ResNet / CBR architectures and the SSL / classifier heads.

References are independent of the code under test: torchvision's published parameter counts, SimCLR's
reported ResNet-50 (2x)/(4x) sizes, a closed-form bottleneck-ResNet parameter count and the Transfusion
paper's CBR specification.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.nets import ResNet

from medssl_monai.networks import (
    BACKBONES,
    CBRNet,
    Classifier,
    ClassifierHead,
    ProjectionHead,
    SSLModel,
    available_backbones,
    get_backbone,
    register_backbone,
)

EXPECTED_NAMES = {
    "resnet18",
    "resnet50",
    "resnet50_2x",
    "resnet50_4x",
    "resnet152",
    "cbr_large_t",
    "cbr_large_w",
    "cbr_small",
    "cbr_tiny",
}
# Transfusion (Raghu et al. 2019): channels per block and kernel size
CBR_SPEC = {
    "cbr_large_t": ((32, 64, 128, 256, 512), 7),
    "cbr_large_w": ((64, 128, 256, 512), 7),
    "cbr_small": ((32, 64, 128, 256), 7),
    "cbr_tiny": ((64, 128, 256, 512), 5),
}
# (block expansion, width multiplier, run on CPU?) -- the wide/deep ones run on the meta device: exact shapes, no
# compute, no memory
RESNET_SPEC = {
    "resnet18": (1, 1, True),
    "resnet50": (4, 1, True),
    "resnet50_2x": (4, 2, False),
    "resnet50_4x": (4, 4, False),
    "resnet152": (4, 1, False),
}



def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bottleneck_resnet_params(layers: tuple[int, ...], width: int, in_channels: int = 3) -> int:
    """Closed-form parameter count of an ImageNet bottleneck ResNet without fc (every stage scaled by width)."""
    planes_per_stage = [64 * width, 128 * width, 256 * width, 512 * width]
    total = 7 * 7 * in_channels * planes_per_stage[0] + 2 * planes_per_stage[0]  # stem conv + BN
    cin = planes_per_stage[0]
    for planes, blocks in zip(planes_per_stage, layers):
        for b in range(blocks):
            total += cin * planes + 2 * planes  # 1x1 + BN
            total += 9 * planes * planes + 2 * planes  # 3x3 + BN
            total += planes * 4 * planes + 2 * 4 * planes  # 1x1 expand + BN
            if b == 0:  # projection shortcut (channels always change in a bottleneck stage's first block)
                total += cin * 4 * planes + 2 * 4 * planes
            cin = 4 * planes
    return total


# ------------------------------------------------------------------ registry


def test_registry_lists_all_backbones():
    assert EXPECTED_NAMES <= set(BACKBONES)
    assert available_backbones() == sorted(BACKBONES)


def test_unknown_backbone_raises_with_choices():
    with pytest.raises(ValueError, match="resnet18"):
        get_backbone("resnet19")


def test_register_custom_backbone_and_protocol_check():
    name = "_test_tiny_cbr"
    try:

        @register_backbone(name)
        def _factory(in_channels: int = 3, **kwargs):
            return CBRNet(channels=(4, 8), kernel_size=3, in_channels=in_channels)

        model = get_backbone(name, in_channels=1)
        assert model.feature_dim == 8
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 8)
        with pytest.raises(ValueError, match="already registered"):
            register_backbone(name, _factory)
        register_backbone(name, lambda in_channels=3, **kw: nn.Linear(in_channels, 2), overwrite=True)
        with pytest.raises(TypeError, match="feature_dim"):
            get_backbone(name)
    finally:
        BACKBONES.pop(name, None)


# ------------------------------------------------------------------ ResNet family


@pytest.mark.parametrize(
    "name, reference",
    [
        ("resnet18", 11_689_512 - (512 * 1000 + 1000)),  # torchvision resnet18 minus fc
        ("resnet50", 25_557_032 - (2048 * 1000 + 1000)),  # torchvision resnet50 minus fc
    ],
)
def test_resnet_param_count_matches_torchvision(name, reference):
    with torch.device("meta"):
        assert n_params(get_backbone(name)) == reference


@pytest.mark.parametrize(
    "name, layers, width, reference",
    [
        ("resnet50", (3, 4, 6, 3), 1, 23_508_032),
        ("resnet50_2x", (3, 4, 6, 3), 2, 94e6),  # SimCLR Table: ResNet-50 (2x) 94M
        ("resnet50_4x", (3, 4, 6, 3), 4, 375e6),  # SimCLR Table: ResNet-50 (4x) 375M
        ("resnet152", (3, 8, 36, 3), 1, 60_192_808 - (2048 * 1000 + 1000)),  # torchvision resnet152 minus fc
    ],
)
def test_resnet_param_counts_formula(name, layers, width, reference):
    with torch.device("meta"):  # no memory, no init cost: only shapes matter here
        model = get_backbone(name)
    count = n_params(model)
    assert count == bottleneck_resnet_params(layers, width)
    assert abs(count - reference) / reference < 0.005
    assert model.feature_dim == 2048 * width
    assert model.conv1.out_channels == 64 * width
    assert [
        stage[-1].conv3.out_channels for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
    ] == [c * 4 * width for c in (64, 128, 256, 512)]


@pytest.mark.parametrize("name", sorted(RESNET_SPEC))
def test_resnet_shapes_and_stage_strides(name):
    expansion, width, on_cpu = RESNET_SPEC[name]
    with torch.device("cpu" if on_cpu else "meta"):
        model = get_backbone(name).eval()
        x = torch.randn(2, 3, 64, 64)
    assert isinstance(model, ResNet)  # really MONAI's ResNet
    assert model.stage_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert list(model.stages()) == model.stage_names
    feature_dim = 512 * expansion * width
    assert model.feature_dim == feature_dim
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    assert out.shape == (2, feature_dim)
    channels = [64 * width] + [c * expansion * width for c in (64, 128, 256, 512)]
    sizes = [16, 16, 8, 4, 2]  # strides 4, 4, 8, 16, 32
    assert [tuple(f.shape) for f in feats.values()] == [(2, c, s, s) for c, s in zip(channels, sizes)]
    if on_cpu:
        torch.testing.assert_close(out, feats["layer4"].mean(dim=(2, 3)))


def test_resnet_imagenet_stem_and_shortcuts():
    model = get_backbone("resnet18")
    assert model.conv1.kernel_size == (7, 7)
    assert model.conv1.stride == (2, 2)
    assert model.conv1.padding == (3, 3)
    assert not model.no_max_pool
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert (model.maxpool.kernel_size, model.maxpool.stride) == (3, 2)
    assert model.fc is None
    # torchvision-style projection shortcut: 1x1 conv without bias + BN
    down = model.layer2[0].downsample
    assert isinstance(down, nn.Sequential) and isinstance(down[1], nn.BatchNorm2d)
    assert down[0].kernel_size == (1, 1) and down[0].stride == (2, 2) and down[0].bias is None
    # the stem is a view on MONAI's modules, not a copy: the state dict keeps MONAI's key names
    assert model.stem.conv1 is model.conv1 and model.stem.bn1 is model.bn1
    assert not any(k.startswith("stem.") for k in model.state_dict())


def test_resnet152_tiny_forward():
    model = get_backbone("resnet152").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2048)


def test_resnet_stem_view_follows_replaced_conv_and_deepcopy():
    model = get_backbone("resnet18")
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    assert model.stem.conv1 is model.conv1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 512)
    clone = copy.deepcopy(model)
    assert clone.stem.conv1 is clone.conv1 and clone.conv1 is not model.conv1
    with pytest.raises(AttributeError):
        model.stem = nn.Identity()
    model.eval()
    assert not model.stem.training


# ------------------------------------------------------------------ CBR family


@pytest.mark.parametrize("name", sorted(CBR_SPEC))
def test_cbr_architecture(name):
    channels, kernel = CBR_SPEC[name]
    model = get_backbone(name).eval()
    assert model.stage_names == [f"block{i}" for i in range(1, len(channels) + 1)]
    assert model.feature_dim == channels[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(channels)
    assert all(c.kernel_size == (kernel, kernel) and c.stride == (1, 1) for c in convs)
    for block in model.stages().values():
        assert isinstance(block.cbr, Convolution)  # built from MONAI blocks
        kinds = [type(m) for m in block.modules()]
        assert nn.BatchNorm2d in kinds and nn.ReLU in kinds
        assert (block.pool.kernel_size, block.pool.stride) == (3, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    assert out.shape == (2, channels[-1])
    expected = [(2, c, 64 // 2**i, 64 // 2**i) for i, c in enumerate(channels, 1)]
    assert [tuple(f.shape) for f in feats.values()] == expected
    torch.testing.assert_close(out, feats[model.stage_names[-1]].mean(dim=(2, 3)))


def test_cbr_slimmed_and_3d():
    slim = get_backbone("cbr_large_w", channels=(64, 128, 64, 32), in_channels=1)
    assert slim.feature_dim == 32
    assert slim(torch.randn(2, 1, 32, 32)).shape == (2, 32)
    vol = get_backbone("cbr_small", in_channels=1, spatial_dims=3, channels=(4, 8), kernel_size=3)
    assert vol.forward_features(torch.randn(2, 1, 16, 16, 16))["block2"].shape == (2, 8, 4, 4, 4)


# ------------------------------------------------------------------ protocol details


@pytest.mark.parametrize("name", ["resnet18", "cbr_small"])
def test_stage_hooks_match_forward_features(name):
    model = get_backbone(name).eval()
    x = torch.randn(2, 3, 32, 32)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        stage.register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out.detach().clone()))
        for n, stage in model.stages().items()
    ]
    with torch.no_grad():
        model(x)
        feats = model.forward_features(x)
    for h in handles:
        h.remove()
    assert list(seen) == model.stage_names
    for n in model.stage_names:
        torch.testing.assert_close(seen[n], feats[n])


def test_forward_features_subset_and_errors():
    model = get_backbone("cbr_small").eval()
    calls: list[str] = []
    for n, stage in model.stages().items():
        stage.register_forward_hook(lambda *_a, n=n: calls.append(n))
    out = model.forward_features(torch.randn(1, 3, 32, 32), stages="block2")
    assert list(out) == ["block2"]
    assert calls == ["block1", "block2"]  # stops after the last requested stage
    with pytest.raises(ValueError, match="block9"):
        model.forward_features(torch.randn(1, 3, 32, 32), stages=["block9"])


@pytest.mark.parametrize("name", ["resnet18", "cbr_small"])
def test_channels_last(name):
    model = get_backbone(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        conv_weight = next(p for p in model.parameters() if p.ndim == 4)
        assert conv_weight.is_contiguous(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ heads


def test_projection_head_simclrv2_structure():
    head = ProjectionHead(32)
    assert head.num_layers == 3 and head.out_features == 128
    lin = [layer.linear for layer in head.layers]
    assert [(m.in_features, m.out_features) for m in lin] == [(32, 32), (32, 32), (32, 128)]
    assert all(m.bias is None for m in lin)
    for layer in head.layers[:-1]:
        assert isinstance(layer.bn, nn.BatchNorm1d) and isinstance(layer.act, nn.ReLU)
    last = head.layers[-1]
    assert not hasattr(last, "act") and last.bn.bias is None and last.bn.weight is not None
    # 2 x (Linear 32x32 + BN scale/shift) + Linear 32x128 + BN scale only
    assert n_params(head) == 2 * (32 * 32 + 2 * 32) + 32 * 128 + 128
    z = head.train()(torch.randn(16, 32) * 3 + 1)
    assert z.shape == (16, 128)
    assert (z < 0).any()  # no ReLU at the end
    torch.testing.assert_close(z.mean(0), torch.zeros(128), atol=1e-5, rtol=0)  # BN without shift


def test_projection_head_options_and_truncation():
    head = ProjectionHead(16, hidden_features=8, out_features=4, num_layers=2)
    assert [(m.linear.in_features, m.linear.out_features) for m in head.layers] == [(16, 8), (8, 4)]
    first = head.truncated(1)
    assert first.num_layers == 1 and first.out_features == 8 and first.layers[0] is head.layers[0]
    with pytest.raises(ValueError):
        head.truncated(3)
    with pytest.raises(ValueError):
        ProjectionHead(16, num_layers=0)


def test_ssl_model_and_classifier_head():
    backbone = get_backbone("cbr_small", channels=(4, 8), kernel_size=3)
    model = SSLModel(backbone)
    features, projections = model(torch.randn(4, 3, 16, 16))
    assert features.shape == (4, 8) and projections.shape == (4, 128)
    head = ClassifierHead(8, 3, dropout=0.5)
    assert isinstance(head.dropout, nn.Dropout) and head(features).shape == (4, 3)
    assert isinstance(ClassifierHead(8, 3).dropout, nn.Identity)


def test_classifier_keeps_projection_layers_and_loads_ssl_weights():
    backbone = get_backbone("cbr_small", channels=(4, 8), kernel_size=3)
    ssl = SSLModel(backbone, ProjectionHead(8, hidden_features=6, out_features=5))
    plain = Classifier(copy.deepcopy(backbone), num_classes=3)
    assert plain.projection_head is None and plain.head.fc.in_features == 8

    clf = Classifier.from_ssl_model(ssl, num_classes=3, keep_projection_layers=1)
    assert clf.head.fc.in_features == 6
    assert clf.projection_head.layers[0] is ssl.projection_head.layers[0]
    assert clf(torch.randn(4, 3, 16, 16)).shape == (4, 3)

    fresh = Classifier(
        get_backbone("cbr_small", channels=(4, 8), kernel_size=3),
        num_classes=3,
        keep_projection_layers=2,
        projection_head=ProjectionHead(8, hidden_features=6, out_features=5),
    )
    assert fresh.head.fc.in_features == 6  # layers 8->6, 6->6 kept; 6->5 dropped
    result = fresh.load_state_dict(ssl.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["head.fc.bias", "head.fc.weight"]
    assert result.unexpected_keys and all(
        k.startswith("projection_head.layers.2.") for k in result.unexpected_keys
    )

    with pytest.raises(ValueError, match="projection_head"):
        Classifier(backbone, 3, keep_projection_layers=1)
    with pytest.raises(ValueError, match="layers"):
        Classifier(backbone, 3, keep_projection_layers=4, projection_head=ssl.projection_head)


def test_classifier_freeze_backbone_is_a_linear_probe():
    backbone = get_backbone("cbr_small", channels=(4, 8), kernel_size=3)
    clf = Classifier(
        backbone, 2, keep_projection_layers=1, projection_head=ProjectionHead(8)
    ).freeze_backbone()
    clf.train()
    assert not backbone.training and not clf.projection_head.training and clf.head.training
    frozen = {k: v.clone() for k, v in clf.state_dict().items() if not k.startswith("head.")}
    head_before = clf.head.fc.weight.detach().clone()
    opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2  # only fc weight and bias
    clf(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step()
    for k, v in clf.state_dict().items():
        if k in frozen:  # parameters *and* BN running statistics unchanged
            assert torch.equal(v, frozen[k]), k
    assert not torch.equal(clf.head.fc.weight, head_before)
    clf.unfreeze_backbone()
    assert all(p.requires_grad for p in clf.parameters()) and backbone.training
