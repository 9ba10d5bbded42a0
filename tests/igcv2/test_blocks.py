"""The IGCV2 block: connectivity of the composed real modules, parameter counts, branch sizes.

Connectivity is measured, not derived: with every conv weight set to 1 and every BatchNorm made
an identity, the block is the sum over all paths through its sparse kernels, so feeding the C
one-hot 1x1 images gives ``paths[i, j]`` = the number of paths from input channel i to output
channel j (a 3x3 conv with padding 1 on a 1x1 image only uses its centre tap).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from igcv2.blocks import (
    KERNEL_AREA,
    ChannelShuffle,
    IGCV2Block,
    block_params,
    branch_sizes,
    channel_shuffle,
    complementary,
)

torch.set_num_threads(1)


def path_counts(block: IGCV2Block) -> torch.Tensor:
    """(C_in, C_out) matrix: entry [i, j] is the number of paths from input i to output j."""
    block.eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.eps = 0.0
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)
        one_hot = torch.eye(block.channels).view(block.channels, block.channels, 1, 1)
        out = block(one_hot)
    assert out.shape == (block.channels, block.out_channels, 1, 1)
    return out[:, :, 0, 0]


def ordered_factorisations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered ``parts``-tuple of positive integers with product ``n`` (independent of the library)."""
    if parts == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in ordered_factorisations(n // d, parts - 1)]


def all_tuples(values: list[int], length: int) -> list[tuple[int, ...]]:
    """Every ``length``-tuple drawn from ``values`` (with repetition)."""
    if length == 0:
        return [()]
    return [(v, *rest) for v in values for rest in all_tuples(values, length - 1)]


# (C, K) with prod K = C: L = 2, 3, 4, K_1 > 1, uneven and non-power-of-two sizes.
COMPLEMENTARY = [
    (16, (1, 16)),
    (12, (3, 4)),
    (64, (1, 8, 8)),
    (64, (2, 4, 8)),
    (64, (4, 2, 8)),
    (36, (1, 6, 6)),
    (24, (2, 3, 4)),
    (24, (4, 3, 2)),
    (48, (3, 2, 8)),
    (64, (1, 4, 4, 4)),
    (64, (2, 2, 4, 4)),
    (30, (1, 2, 3, 5)),
    (120, (2, 3, 4, 5)),
]


@pytest.mark.parametrize(("channels", "branches"), COMPLEMENTARY)
def test_complementary_block_has_exactly_one_path_between_every_pair(channels: int, branches: tuple[int, ...]) -> None:
    assert complementary(branches, channels)
    paths = path_counts(IGCV2Block(channels, branches))
    assert torch.equal(paths, torch.ones(channels, channels))


@pytest.mark.parametrize(("channels", "levels"), [(8, 2), (8, 3), (12, 3), (16, 4), (24, 3)])
def test_every_complementary_factorisation_is_dense_with_unique_paths(channels: int, levels: int) -> None:
    """Exhaustive: all ordered K with prod K = C, including K_1 > 1 and size-1 later branches."""
    for branches in ordered_factorisations(channels, levels):
        paths = path_counts(IGCV2Block(channels, branches))
        assert torch.equal(paths, torch.ones(channels, channels)), branches


@pytest.mark.parametrize(("channels", "levels"), [(8, 3), (12, 3), (16, 3), (16, 4)])
def test_every_non_complementary_block_misses_pairs_or_repeats_paths(channels: int, levels: int) -> None:
    """Exhaustive over divisor tuples with prod K != C: some pair has 0 paths (prod < C) or > 1 (prod > C)."""
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    tried = 0
    for branches in all_tuples(divisors, levels):
        if math.prod(branches) == channels:
            continue
        tried += 1
        assert not complementary(branches, channels)
        paths = path_counts(IGCV2Block(channels, branches))
        # Every output sums over exactly prod(K) paths, so the total is fixed by the branch sizes ...
        assert torch.equal(paths.sum(0), torch.full((channels,), float(math.prod(branches))))
        # ... and it cannot be spread as exactly one path per input.
        if math.prod(branches) < channels:
            assert (paths == 0).any(), branches
        else:
            assert (paths > 1).any(), branches
    assert tried > 10


def test_too_small_product_leaves_pairs_unconnected() -> None:
    paths = path_counts(IGCV2Block(64, (1, 4, 4)))  # prod 16 != 64
    assert (paths == 0).any()
    assert torch.equal((paths > 0).sum(0), torch.full((64,), 16))  # each output sees only 16 inputs
    assert paths.max() == 1


def test_too_large_product_gives_repeated_paths() -> None:
    paths = path_counts(IGCV2Block(8, (1, 4, 4)))  # prod 16 != 8
    assert torch.equal(paths, torch.full((8, 8), 2.0))


@pytest.mark.parametrize(("channels", "branches"), [(64, (1, 8, 8)), (64, (2, 4, 8)), (64, (1, 4, 4, 4))])
def test_block_without_its_channel_shuffles_is_not_dense(channels: int, branches: tuple[int, ...]) -> None:
    block = IGCV2Block(channels, branches)
    shuffles = [i for i, m in enumerate(block.body) if isinstance(m, ChannelShuffle)]
    assert shuffles, "a complementary block with L >= 3 needs at least one permutation"
    assert torch.equal(path_counts(block), torch.ones(channels, channels))
    for i in shuffles:
        block.body[i] = nn.Identity()
    paths = path_counts(block)
    assert (paths == 0).any()
    assert (paths > 1).any()


def test_block_with_a_wrong_shuffle_is_not_dense() -> None:
    block = IGCV2Block(64, (1, 8, 8))
    (i,) = [i for i, m in enumerate(block.body) if isinstance(m, ChannelShuffle)]
    block.body[i] = ChannelShuffle(4)  # shuffles by the wrong group count
    paths = path_counts(block)
    assert not torch.equal(paths, torch.ones(64, 64))
    assert (paths == 0).any()


@pytest.mark.parametrize(
    ("channels", "branches", "out_channels"),
    [(64, (1, 8, 8), 128), (24, (2, 3, 4), 48), (36, (1, 6, 6), 72), (64, (1, 4, 4, 4), 96)],
)
def test_widening_block_connects_every_input_to_every_output_once(
    channels: int, branches: tuple[int, ...], out_channels: int
) -> None:
    paths = path_counts(IGCV2Block(channels, branches, out_channels=out_channels))
    assert paths.shape == (channels, out_channels)
    assert torch.equal(paths, torch.ones(channels, out_channels))


def test_strided_block_keeps_unique_paths_and_halves_resolution() -> None:
    block = IGCV2Block(36, (1, 6, 6), out_channels=72, stride=2)
    assert torch.equal(path_counts(block), torch.ones(36, 72))
    assert block(torch.randn(2, 36, 8, 8)).shape == (2, 72, 4, 4)


def test_w1_sees_the_whole_3x3_neighbourhood() -> None:
    """The 1x1-image trick sees only the centre tap of W_1; check a corner tap is live too."""
    block = IGCV2Block(8, (1, 8))
    path_counts(block)  # all weights 1, BN identity
    x = torch.zeros(1, 8, 3, 3)
    x[0, 0, 0, 0] = 1.0  # a corner pixel reaches the centre output through a corner tap
    with torch.no_grad():
        out = block(x)
    assert torch.equal(out[0, :, 1, 1], torch.ones(8))


@pytest.mark.parametrize(
    ("channels", "branches"),
    [(64, (1, 8, 8)), (64, (2, 4, 8)), (64, (1, 4, 4, 4)), (36, (1, 6, 6)), (12, (1, 12)), (64, (1, 4, 4))],
)
def test_block_parameter_count_matches_formula(channels: int, branches: tuple[int, ...]) -> None:
    block = IGCV2Block(channels, branches)
    conv_weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))
    expected = channels * (9 * branches[0] + sum(branches[1:]))
    assert conv_weights == expected
    assert block_params(channels, branches) == expected
    assert all(m.bias is None for m in block.modules() if isinstance(m, nn.Conv2d))


def test_widening_block_parameter_count() -> None:
    """The last 1x1 conv emits out_channels from K_L inputs each: C*9*K_1 + C*K_2 + out*K_3."""
    block = IGCV2Block(64, (1, 8, 8), out_channels=128)
    conv_weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))
    assert conv_weights == 64 * 9 + 64 * 8 + 128 * 8


def test_channel_shuffle_follows_the_documented_mapping() -> None:
    groups, per_group = 4, 3
    x = torch.arange(groups * per_group, dtype=torch.float32).view(1, -1, 1, 1)
    out = channel_shuffle(x, groups)[0, :, 0, 0].long().tolist()
    # channel g * per_group + k moves to position k * groups + g
    expected = [0] * (groups * per_group)
    for g in range(groups):
        for k in range(per_group):
            expected[k * groups + g] = g * per_group + k
    assert out == expected
    assert ChannelShuffle(groups)(x).equal(channel_shuffle(x, groups))


@pytest.mark.parametrize(
    ("channels", "levels", "expected"),
    [(64, 3, (1, 8, 8)), (64, 2, (1, 64)), (64, 4, (1, 4, 4, 4)), (36, 3, (1, 6, 6)), (96, 3, (1, 8, 12))],
)
def test_branch_sizes_known_values(channels: int, levels: int, expected: tuple[int, ...]) -> None:
    got = branch_sizes(channels, levels)
    assert math.prod(got) == channels
    assert sorted(got[1:]) == sorted(expected[1:])
    assert got[0] == expected[0] == 1


@pytest.mark.parametrize("channels", [4, 7, 12, 24, 48, 64, 96, 120, 240, 384, 480, 960])
@pytest.mark.parametrize("levels", [2, 3, 4])
@pytest.mark.parametrize("depthwise", [True, False])
def test_branch_sizes_are_complementary_and_cheapest(channels: int, levels: int, depthwise: bool) -> None:
    candidates = [k for k in ordered_factorisations(channels, levels) if all(s > 1 for s in k[1:])]
    if depthwise:
        candidates = [k for k in candidates if k[0] == 1]
    if not candidates:
        with pytest.raises(ValueError, match="complementary condition"):
            branch_sizes(channels, levels, depthwise=depthwise)
        return
    got = branch_sizes(channels, levels, depthwise=depthwise)
    assert len(got) == levels
    assert math.prod(got) == channels
    assert all(k > 1 for k in got[1:]), "a 1x1 branch of size 1 collapses a level"
    if depthwise:
        assert got[0] == 1
    # Balanced as far as integers allow: no exact factorisation has fewer block parameters.
    assert block_params(channels, got) == min(block_params(channels, k) for k in candidates)
    # And the real block built from them is dense with unique paths.
    if channels <= 120:
        assert torch.equal(path_counts(IGCV2Block(channels, got)), torch.ones(channels, channels))


def test_branch_sizes_close_to_balance_condition() -> None:
    """9*K_1 = K_2 = ... = K_L = (9C)^(1/L) when integers allow: C = 576, L = 3, free K_1 gives (2, 16, 18)-ish."""
    got = branch_sizes(576, 3, depthwise=False)
    assert got[0] > 1, "depthwise=False must explore K_1 > 1 when it is cheaper"
    assert math.prod(got) == 576
    assert block_params(576, got) < block_params(576, branch_sizes(576, 3))
    ideal = (KERNEL_AREA * 576) ** (1 / 3)
    balanced = [KERNEL_AREA * got[0], *got[1:]]
    assert all(abs(math.log(b / ideal)) < math.log(1.5) for b in balanced)


def test_depthwise_false_gives_k1_above_one_for_small_c() -> None:
    got = branch_sizes(24, 2, depthwise=False)
    assert math.prod(got) == 24
    assert got[0] > 1


@pytest.mark.parametrize(
    ("channels", "levels", "match"),
    [
        (64, 1, "L >= 2"),
        (64, 0, "L >= 2"),
        (7, 3, "C=7 cannot be split into 3 levels"),
        (13, 3, "C=13 cannot be split into 3 levels"),
        (4, 4, "C=4 cannot be split into 4 levels"),
        (0, 3, "channels must be positive"),
        (-8, 3, "channels must be positive"),
    ],
)
def test_branch_sizes_rejects_impossible_settings(channels: int, levels: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        branch_sizes(channels, levels)


def test_prime_channels_work_with_two_levels_only() -> None:
    assert branch_sizes(7, 2) == (1, 7)
    with pytest.raises(ValueError, match="complementary condition"):
        branch_sizes(7, 3)


@pytest.mark.parametrize(
    ("channels", "branches", "out_channels", "match"),
    [
        (64, (8,), None, "L >= 2"),
        (64, (1, 3, 8), None, "must divide C=64"),
        (64, (0, 8, 8), None, "must divide C=64"),
        (64, (1, 8, 8), 100, "multiple of the last conv's 8 groups"),
    ],
)
def test_block_rejects_bad_arguments(
    channels: int, branches: tuple[int, ...], out_channels: int | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        IGCV2Block(channels, branches, out_channels)
