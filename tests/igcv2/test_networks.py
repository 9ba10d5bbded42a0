"""Network builders and presets: calibration against the paper's figures, forward/backward, wrappers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import igcv2.networks as networks_module
from igcv2.blocks import IGCV2Block
from igcv2.complexity import count_macs, count_params
from igcv2.networks import BUILDERS, PRESETS, IGCV2Net, IGCV2Unit, Normalized, build, igcv2_imagenet
from igcv2.summary import preset_table

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def table() -> dict[str, dict[str, object]]:
    return {row["preset"]: row for row in preset_table()}


def within(value: float, target: float, tolerance: float) -> bool:
    return abs(value - target) <= tolerance * target


def test_cifar_preset_matches_igcv2_star_c416_params(table: dict[str, dict[str, object]]) -> None:
    builder, kwargs, size = PRESETS["cifar10-c416"]
    assert builder == "igcv2_cifar"
    params = table["cifar10-c416"]["params"]
    assert within(params, 650_000, 0.05), params
    assert params == count_params(build(builder, **kwargs))
    assert size == (3, 32, 32)


def test_cifar_builder_defaults_are_the_c416_calibration() -> None:
    assert within(count_params(build("igcv2_cifar")), 650_000, 0.05)


def test_cifar_network_has_depth_20() -> None:
    """1 stem conv + 18 IGCV2 blocks + 1 classifier, residual."""
    net = build("igcv2_cifar")
    units = [m for m in net.modules() if isinstance(m, IGCV2Unit)]
    assert len(units) == 18
    assert all(u.residual for u in units)
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 1


@pytest.mark.parametrize(
    ("preset", "target"), [("imagenet-1.0", 564e6), ("imagenet-0.5", 156e6), ("imagenet-0.25", 46e6)]
)
def test_imagenet_presets_match_published_multiply_adds(
    table: dict[str, dict[str, object]], preset: str, target: float
) -> None:
    row = table[preset]
    assert row["input"] == [3, 224, 224]
    assert row["builder"] == "igcv2_imagenet"
    assert within(row["macs"], target, 0.03), f"{preset}: {row['macs'] / 1e6:.1f}M MACs vs {target / 1e6:.0f}M"


def test_imagenet_macs_are_counted_on_the_real_network() -> None:
    """Cross-check the table against a direct count (the table must not be a hard-coded figure)."""
    net = igcv2_imagenet(0.25)
    assert count_macs(net, (3, 224, 224)) == next(r for r in preset_table() if r["preset"] == "imagenet-0.25")["macs"]
    # Halving the resolution divides the conv MACs by about 4 (the classifier's share is fixed).
    assert 3.5 < count_macs(net, (3, 224, 224)) / count_macs(net, (3, 112, 112)) < 4.1


def test_fashion_preset_is_small_and_takes_28x28_grayscale(table: dict[str, dict[str, object]]) -> None:
    builder, kwargs, size = PRESETS["fashion"]
    assert size == (1, 28, 28)
    assert table["fashion"]["params"] <= 500_000
    net = build(builder, **kwargs).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_forward_and_backward(preset: str) -> None:
    builder, kwargs, (c, h, w) = PRESETS[preset]
    torch.manual_seed(0)
    net = build(builder, **kwargs).train()
    if h > 64:  # the ImageNet networks pool globally, so a small image exercises every layer quickly
        h = w = 64
    x = torch.randn(2, c, h, w)
    logits = net(x)
    classes = net.classifier.out_features
    assert logits.shape == (2, classes)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    stem = net.features[0]
    assert stem.weight.grad.abs().sum() > 0, "gradient must reach the stem"


def test_a_training_step_reduces_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    net = build("igcv2_fashion").train()
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_networks_are_built_from_igcv2_blocks_with_complementary_branches() -> None:
    for builder, kwargs, _ in PRESETS.values():
        blocks = [m for m in build(builder, **kwargs).modules() if isinstance(m, IGCV2Block)]
        assert blocks
        for b in blocks:
            assert math.prod(b.branches) == b.channels
            assert len(b.branches) == (2 if builder == "igcv2_fashion" else 3)  # the default model is L = 2


def test_levels_kwarg_changes_block_depth() -> None:
    net = build("igcv2_fashion", levels=3, widths=[96, 192, 384])
    assert {len(m.branches) for m in net.modules() if isinstance(m, IGCV2Block)} == {3}


def test_fashion_widths_and_repeats_shape_the_stages() -> None:
    net = build("igcv2_fashion", stem=16, widths=[32, 64], repeats=[1, 2])
    blocks = [m for m in net.modules() if isinstance(m, IGCV2Block)]
    assert [(b.channels, b.out_channels) for b in blocks] == [(16, 32), (32, 64), (64, 64)]
    assert net.classifier.in_features == 64
    with pytest.raises(ValueError, match="differ in length"):
        build("igcv2_fashion", widths=[32, 64], repeats=[1])


def test_residual_units_start_as_identity_plus_relu() -> None:
    net = build("igcv2_cifar", width=16).eval()
    unit = next(m for m in net.modules() if isinstance(m, IGCV2Unit) and m.stride == 1 and m.pad_channels == 0)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(unit(x), torch.relu(x))


def test_widening_strided_residual_shortcut_shapes() -> None:
    unit = IGCV2Unit(16, 32, stride=2, levels=3, residual=True)
    assert unit(torch.randn(2, 16, 7, 7)).shape == (2, 32, 4, 4)
    with pytest.raises(ValueError, match="cannot narrow 32 -> 16"):
        IGCV2Unit(32, 16, stride=1, levels=3, residual=True)


def test_build_rejects_unknown_builders() -> None:
    with pytest.raises(ValueError, match="unknown builder 'resnet50'"):
        build("resnet50")
    assert set(BUILDERS) >= {"igcv2_fashion", "igcv2_cifar", "igcv2_imagenet"}


def test_imagenet_builder_rejects_unknown_width() -> None:
    with pytest.raises(ValueError, match="width_mult must be one of"):
        igcv2_imagenet(0.75)


def test_network_needs_stages() -> None:
    with pytest.raises(ValueError, match="at least one stage"):
        IGCV2Net([], 16)


def test_builders_document_their_choices() -> None:
    for name, fn in BUILDERS.items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, name
    doc = networks_module.__doc__ or ""
    assert "BN" in doc and "ReLU" in doc and "residual" in doc


@pytest.mark.parametrize(
    ("network", "mean", "std", "shape"),
    [
        ("fashion", [0.2860], [0.3530], (5, 28, 28, 1)),
        ("cifar", [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], (4, 20, 24, 3)),
    ],
)
def test_normalized_wrapper_equals_manual_normalisation(
    network: str, mean: list[float], std: list[float], shape: tuple[int, int, int, int]
) -> None:
    torch.manual_seed(0)
    net = build("igcv2_fashion") if network == "fashion" else build("igcv2_cifar", width=16)
    net.eval()
    # Random BN statistics and affine parameters so that the network is not a near-constant map.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    nn.init.normal_(net.classifier.weight)  # logits of order 1, so the tolerance below is tight
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    wrapped = Normalized(net, mean, std).eval()
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    manual = (images.permute(0, 3, 1, 2).float() / 255.0 - mean_t) / std_t
    with torch.no_grad():
        expected = net(manual)
        got = wrapped(images)
    assert got.shape == (shape[0], 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # The channel order matters: swapping mean/std per channel must change the answer.
    if len(mean) > 1:
        with torch.no_grad():
            swapped = Normalized(net, mean[::-1], std[::-1])(images)
        assert not torch.allclose(swapped, expected, atol=1e-4)


def test_normalized_wrapper_keeps_no_state_in_the_checkpoint() -> None:
    net = build("igcv2_fashion")
    wrapped = Normalized(net, [0.5], [0.25])
    assert set(wrapped.state_dict()) == {f"network.{k}" for k in net.state_dict()}
