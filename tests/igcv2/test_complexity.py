"""Parameter and multiply-add counting on networks small enough to count by hand."""

from __future__ import annotations

import torch
from torch import nn

from igcv2.blocks import IGCV2Block
from igcv2.complexity import count_macs, count_params


def tiny_net() -> nn.Sequential:
    # conv: 3 -> 8 channels, 3x3, stride 2, padding 1: a 3x10x14 input gives 8x5x7.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 7, 4),
    )


def test_count_macs_of_conv_plus_linear_by_hand() -> None:
    conv_macs = (8 * 5 * 7) * (3 * 3 * 3)  # each output value: 3 input channels x 3x3 taps
    linear_macs = 4 * (8 * 5 * 7)
    assert count_macs(tiny_net(), (3, 10, 14)) == conv_macs + linear_macs == 8680


def test_count_macs_of_grouped_and_pointwise_convs_by_hand() -> None:
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False),  # 8x6x6 out, 2 inputs per group x 9 taps
        nn.Conv2d(8, 8, 1, groups=8, bias=False),  # depthwise 1x1: one MAC per output value
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    assert count_macs(net, (4, 6, 6)) == 8 * 36 * 2 * 9 + 8 * 36 * 1 + 3 * 8


def test_count_macs_of_an_igcv2_block_by_hand() -> None:
    block = IGCV2Block(64, (1, 8, 8))
    # per output pixel: 64*9 (depthwise 3x3) + 64*8 + 64*8 (two 1x1 convs, 8 inputs per branch)
    assert count_macs(block, (64, 5, 5)) == 25 * (64 * 9 + 64 * 8 + 64 * 8)


def test_count_params_is_the_sum_of_parameter_sizes() -> None:
    net = tiny_net()
    by_hand = (8 * 3 * 9 + 8) + (8 + 8) + (4 * 280 + 4)  # conv w+b, BN weight+bias, linear w+b
    assert count_params(net) == by_hand == sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers())
    assert buffers > 0  # BN running statistics exist and are not counted


def test_count_macs_leaves_the_model_as_it_found_it() -> None:
    net = tiny_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    count_macs(net, (3, 10, 14))
    assert net.training
    assert all(not m._forward_hooks for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BN running stats must not move"
    # Counting twice gives the same answer (hooks removed, nothing accumulated).
    assert count_macs(net, (3, 10, 14)) == count_macs(net, (3, 10, 14))

    net.eval()
    count_macs(net, (3, 10, 14))
    assert not net.training
