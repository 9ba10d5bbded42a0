"""The IGCV2 block: a dense convolution replaced by a product of structured sparse kernels.

Xie, Wang et al., "Interleaved Structured Sparse Convolutional Neural Networks", CVPR 2018:
W = P_L W_L ... P_2 W_2 P_1 W_1, where W_1 is a 3x3 group convolution with K_1 channels
per branch (K_1 = 1: channel-wise / depthwise) and W_2..W_L are 1x1 group convolutions with
K_l channels per branch. The permutations P_l are channel shuffles. When prod(K_l) = C
(*complementary condition*) every output channel is reached from every input channel
through exactly one path, so the product is a dense kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

KERNEL_AREA = 9  # S in the paper: the 3x3 spatial kernel of W_1


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Permute channels so that each group of the next group conv takes one channel per group.

    Channel index c = g * (C // groups) + k becomes k * groups + g: the within-group digit
    that the previous conv mixed becomes the slowest digit, the next digit the fastest.
    """
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    """Module form of :func:`channel_shuffle`, so the permutation shows in ``print(model)``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def _ordered_factorisations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered tuple of ``parts`` positive integers whose product is ``n``."""
    if parts == 1:
        return [(n,)]
    out = []
    for d in range(1, n + 1):
        if n % d == 0:
            out.extend((d, *rest) for rest in _ordered_factorisations(n // d, parts - 1))
    return out


def block_params(channels: int, branch_sizes: tuple[int, ...]) -> int:
    """Weights of one block (no bias, no BN): C * (9*K_1 + K_2 + ... + K_L)."""
    return channels * (KERNEL_AREA * branch_sizes[0] + sum(branch_sizes[1:]))


def branch_sizes(channels: int, levels: int = 3, depthwise: bool = True) -> tuple[int, ...]:
    """Branch sizes (K_1, ..., K_L) with prod K_l = C, as balanced as integers allow.

    Balance (9*K_1 = K_2 = ... = K_L) minimises the block's parameters, so among all exact
    factorisations we take the one with the fewest parameters, ties broken by the smallest
    spread of (9*K_1, K_2, ..., K_L). ``depthwise`` fixes K_1 = 1 (a channel-wise W_1).
    """
    if levels < 2:
        raise ValueError(f"an IGCV2 block needs L >= 2 levels, got L={levels}")
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    if depthwise:
        candidates = [(1, *rest) for rest in _ordered_factorisations(channels, levels - 1)]
    else:
        candidates = _ordered_factorisations(channels, levels)
    # A branch of size 1 in W_2..W_L is a per-channel scale: the block would collapse to fewer levels.
    candidates = [k for k in candidates if all(size > 1 for size in k[1:])]
    if not candidates:
        raise ValueError(
            f"C={channels} cannot be split into {levels} levels with every 1x1 branch larger "
            f"than 1 (complementary condition prod K_l = C); choose a C with more prime factors "
            f"or fewer levels"
        )

    def cost(k: tuple[int, ...]) -> tuple[int, float]:
        balanced = [KERNEL_AREA * k[0], *k[1:]]
        spread = max(math.log(b) for b in balanced) - min(math.log(b) for b in balanced)
        return block_params(channels, k), spread

    return min(candidates, key=cost)


class IGCV2Block(nn.Module):
    """One interleaved structured sparse convolution: W_1 (3x3) then L-1 pointwise group convs.

    Each conv is followed by BatchNorm; the permutation P_l (channel shuffle by the conv's
    group count) sits between consecutive convs. There is no ReLU inside the product, so the
    block is a factorised *linear* convolution as in the paper's analysis; the network adds one
    ReLU after the block. ``out_channels`` lets the last 1x1 conv widen the output (each of its
    C/K_L branches emits out_channels*K_L/C channels), which is how stages change width.
    """

    def __init__(
        self,
        channels: int,
        branches: tuple[int, ...],
        out_channels: int | None = None,
        stride: int = 1,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if len(branches) < 2:
            raise ValueError(f"an IGCV2 block needs L >= 2 branch sizes, got {branches}")
        if any(k < 1 or channels % k for k in branches):
            raise ValueError(f"every branch size must divide C={channels}, got {branches}")
        last_groups = channels // branches[-1]
        if out_channels % last_groups:
            raise ValueError(
                f"out_channels={out_channels} must be a multiple of the last conv's {last_groups} groups (C/K_L)"
            )
        self.channels = channels
        self.out_channels = out_channels
        self.branches = tuple(branches)
        layers: list[nn.Module] = []
        for level, k in enumerate(branches):
            groups = channels // k
            is_first, is_last = level == 0, level == len(branches) - 1
            layers.append(
                nn.Conv2d(
                    channels,
                    out_channels if is_last else channels,
                    kernel_size=3 if is_first else 1,
                    stride=stride if is_first else 1,
                    padding=1 if is_first else 0,
                    groups=groups,
                    bias=False,
                )
            )
            layers.append(nn.BatchNorm2d(out_channels if is_last else channels))
            if not is_last and groups not in (1, channels):
                # groups == C (K=1) or groups == 1 (dense): the shuffle is the identity.
                layers.append(ChannelShuffle(groups))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, out={self.out_channels}, K={self.branches}"


def complementary(branches: tuple[int, ...], channels: int) -> bool:
    """The complementary condition: prod K_l = C."""
    return math.prod(branches) == channels


__all__ = [
    "ChannelShuffle",
    "IGCV2Block",
    "block_params",
    "branch_sizes",
    "channel_shuffle",
    "complementary",
]
