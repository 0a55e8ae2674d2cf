"""Backbones, heads and presets against the paper's Table 1 and the official definitions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_train.models import PRESETS, SimCLRv2, build_model, count_weights, get_preset, resnet
from ssl_train.models.resnet import AvgPoolShortcut, Bottleneck, SelectiveKernelConv

from conftest import run_cli

TABLE1 = {
    "r50_1x_sk0": 24, "r50_1x_sk1": 35, "r50_2x_sk0": 94, "r50_2x_sk1": 140,
    "r101_1x_sk0": 43, "r101_1x_sk1": 65, "r101_2x_sk0": 170, "r101_2x_sk1": 257,
    "r152_1x_sk0": 58, "r152_1x_sk1": 89, "r152_2x_sk0": 233, "r152_2x_sk1": 354,
    "r152_3x_sk1": 795,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_backbone_sizes_round_to_table1_and_build_on_meta(name: str) -> None:
    backbone = get_preset(name).backbone("meta")
    assert all(p.device.type == "meta" for p in backbone.parameters())
    params, with_bn_stats = count_weights(backbone)
    assert round(with_bn_stats / 1e6) == TABLE1[name]
    assert abs(params / 1e6 - TABLE1[name]) < 1.0  # trainable parameters alone: within a million


def test_models_command_lists_every_preset_with_its_size() -> None:
    result = run_cli("models", "--json", tool="ssl-train")
    assert result.returncode == 0, result.stderr
    rows = {row["preset"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == set(PRESETS) and {"tiny", "tiny_student"} <= set(rows)
    for name, millions in TABLE1.items():
        assert rows[name]["paper_millions"] == millions
        assert round(rows[name]["backbone_params_with_bn_stats"] / 1e6) == millions
    table = run_cli("models", tool="ssl-train").stdout
    assert "r152_3x_sk1" in table and "794.70" in table


def test_bottleneck_details_follow_the_official_resnet() -> None:
    net = resnet(50, 1)
    block = net.layer2[0]
    assert isinstance(block, Bottleneck)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # stride on the 3x3
    assert block.downsample[0].stride == (2, 2)  # plain projection shortcut without SK
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert (module.eps, module.momentum) == (1e-5, 0.1)  # Keras momentum 0.9
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for b in layer:
            assert torch.all(b.bn3.weight == 0)  # each block's last BN gamma starts at zero
            assert torch.all(b.bn1.weight == 1)
    assert net.num_features == 2048
    assert isinstance(net.maxpool, nn.MaxPool2d) and net.conv1.kernel_size == (7, 7)


def test_selective_kernel_and_resnet_d_structure() -> None:
    with torch.device("meta"):  # the structure only: no memory, no initialisation
        net, r152 = resnet(50, 2, sk_ratio=0.0625), resnet(152, 1, 0.0625)
    stem = net.conv1
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [
        (64, 2),
        (64, 1),
        (128, 1),
    ]  # 32w s2, 32w, 64w
    block = net.layer3[0]
    sk = block.conv2
    assert isinstance(sk, SelectiveKernelConv)
    assert sk.conv.out_channels == 2 * 512 and sk.conv.stride == (2, 2)
    assert sk.fc1.out_channels == max(int(512 * 0.0625), 32) == 32
    assert sk.fc2.out_channels == 2 * 512
    shortcut = block.downsample
    assert isinstance(shortcut[0], AvgPoolShortcut) and shortcut[0].stride == 2
    assert shortcut[1].stride == (1, 1) and shortcut[1].kernel_size == (1, 1)
    assert r152.layer4[0].conv2.fc1.out_channels == 512 * 0.0625


def test_selective_kernel_equals_a_transcription_of_the_official_layer() -> None:
    torch.manual_seed(0)
    sk = SelectiveKernelConv(8, 6, stride=1, sk_ratio=0.0625).train()
    x = torch.randn(4, 8, 5, 5)
    actual = sk(x)  # training mode: batch statistics, so running stats do not matter
    # tf2/resnet.py SK_Conv2D.call, channels-first
    inputs = F.relu(sk.bn(sk.conv(x)))
    inputs = torch.stack(torch.split(inputs, 6, dim=1))
    global_features = inputs.sum(0).mean(dim=(2, 3), keepdim=True)
    global_features = F.relu(sk.fc1_bn(sk.fc1(global_features)))
    mixing = torch.stack(torch.split(sk.fc2(global_features), 6, dim=1)).softmax(0)
    torch.testing.assert_close(actual, (inputs * mixing).sum(0))


def test_resnet_d_average_pools_like_tensorflow() -> None:
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    # stride 1 'SAME': pad after, padding left out of the mean
    expected_same = torch.tensor([[[[3.0, 4.0, 4.5], [6.0, 7.0, 7.5], [7.5, 8.5, 9.0]]]])
    torch.testing.assert_close(AvgPoolShortcut(1)(x), expected_same)
    # stride 2: pad one zero after, 'VALID' 2x2 average counting the zeros
    expected_valid = torch.tensor([[[[3.0, 2.25], [3.75, 9.0 / 4]]]])
    torch.testing.assert_close(AvgPoolShortcut(2)(x), expected_valid)


def test_plain_r50_exports_to_torchvision_and_computes_the_same() -> None:
    from torchvision.models import resnet50

    ours = resnet(50, 1).eval()
    theirs = resnet50(weights=None)
    theirs.fc = nn.Identity()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # raises on any key mismatch
    theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_small_images_stem_and_fractional_widths() -> None:
    net = resnet(18, 0.25, sk_ratio=0.0625, small_images=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert isinstance(net.layer1[0].conv1, SelectiveKernelConv)
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 128)
    with pytest.raises(ValueError, match="depth 42"):
        resnet(42)
    with pytest.raises(ValueError, match="preset"):
        get_preset("r51_1x_sk0")


def test_projection_head_and_classifier_follow_the_official_model() -> None:
    model = build_model("tiny", num_classes=10, from_proj_layer=1)
    head = model.head
    assert len(head.linears) == 3 and all(linear.bias is None for linear in head.linears)
    assert [n.bias is not None for n in head.norms] == [True, True, False]  # last BN has no beta
    assert [n.weight is not None for n in head.norms] == [True, True, True]
    assert head.linears[-1].out_features == 128
    assert model.classifier.in_features == head.linears[0].out_features

    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        _, hiddens = model.head(out.features)
        torch.testing.assert_close(out.logits, model.classifier(hiddens[1]))
        assert torch.all(hiddens[1] >= 0)  # the first layer's output after its ReLU

    from_backbone = build_model("tiny", num_classes=10, from_proj_layer=0)
    assert from_backbone.classifier.in_features == from_backbone.backbone.num_features
    model.zero_init_classifier()
    assert torch.all(model.classifier.weight == 0) and torch.all(model.classifier.bias == 0)
    with pytest.raises(ValueError, match="from_proj_layer"):
        SimCLRv2(resnet(18, 0.25, small_images=True), head_layers=2, from_proj_layer=3)
    assert (
        SimCLRv2(resnet(18, 0.25, small_images=True), head_layers=2, proj_dim=64).head.out_dim == 64
    )
