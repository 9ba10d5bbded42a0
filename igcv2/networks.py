"""IGCV2 networks: one stage-table-driven builder and the named presets.

The paper (Xie, Wang et al., CVPR 2018) does not publish BN/ReLU placement or exact widths for
every network, so these are our choices, kept the same across presets:

* stem: dense 3x3 conv -> BN -> ReLU;
* every unit is one :class:`~igcv2.blocks.IGCV2Block` (BN after each of its convs, no ReLU
  inside the sparse product) followed by one ReLU;
* ``residual=True`` adds an identity shortcut around each unit, and a parameter-free one where
  a unit strides or widens (average pooling + zero channels, ResNet "option A"); the ReLU then
  comes after the sum. ``residual=False`` gives the plain MobileNetV1 shape used on ImageNet;
* head: global average pooling -> dropout -> linear classifier.

A network's shape is data: a stem width and a table of ``(channels, repeats, stride)`` rows;
the first unit of a row applies the stride and the widening, the others keep the shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from igcv2.blocks import IGCV2Block, branch_sizes

StageRow = tuple[int, int, int]  # (channels, repeats, stride)


class IGCV2Unit(nn.Module):
    """An IGCV2 block, an optional parameter-free shortcut, and the ReLU after them."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, levels: int, residual: bool):
        super().__init__()
        self.block = IGCV2Block(in_channels, branch_sizes(in_channels, levels), out_channels, stride)
        self.residual = residual
        self.stride = stride
        self.pad_channels = out_channels - in_channels
        if residual and self.pad_channels < 0:
            raise ValueError(f"a residual unit cannot narrow {in_channels} -> {out_channels} channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.residual:
            shortcut = F.avg_pool2d(x, self.stride, ceil_mode=True) if self.stride > 1 else x
            if self.pad_channels:
                shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad_channels))
            out = out + shortcut
        return F.relu(out)


class IGCV2Net(nn.Module):
    """A classifier built from a stem and a table of IGCV2 stages."""

    def __init__(
        self,
        stages: Sequence[StageRow],
        stem_channels: int,
        in_channels: int = 3,
        num_classes: int = 10,
        levels: int = 3,
        stem_stride: int = 1,
        residual: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not stages:
            raise ValueError("a network needs at least one stage row")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem_channels, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        ]
        width = stem_channels
        for channels, repeats, stride in stages:
            for i in range(repeats):
                layers.append(IGCV2Unit(width, channels, stride if i == 0 else 1, levels, residual))
                width = channels
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        # Zero the last BN of each residual unit: units start as identities, which trains faster.
        for m in self.modules():
            if isinstance(m, IGCV2Unit) and m.residual:
                nn.init.zeros_(m.block.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


def igcv2_fashion(
    num_classes: int = 10,
    in_channels: int = 1,
    stem: int = 48,
    widths: Sequence[int] = (96, 192, 352),
    repeats: Sequence[int] = (3, 4, 3),
    levels: int = 2,
    **kwargs: Any,
) -> IGCV2Net:
    """The default model: 28x28 grayscale (Fashion-MNIST / MNIST), residual, 0.50M parameters.

    A ``stem``-channel dense conv at full resolution, then one stage per entry of ``widths``
    (``repeats`` units each) at 14, 7 and 4 pixels. Striding in the first unit of stage 1 makes
    a training step 2.4x cheaper on a CPU than a full-resolution first stage.

    L = 2 by default: W_1 channel-wise, W_2 a dense 1x1 (K = (1, C), the Xception-like member of
    the IGCV2 family). On this project's 2-core CPU an L = 2 unit trains faster per step than an
    L = 3 one of the same width (fewer, larger kernels) and holds more parameters, and the
    96k-parameter L = 3 network (``levels=3, widths=(96, 192, 384)``) stopped at 0.919 top-1 on
    Fashion-MNIST, under-fitting. The shipped artifact's ``config.json`` records its arguments.
    """
    if len(widths) != len(repeats):
        raise ValueError(f"widths {tuple(widths)} and repeats {tuple(repeats)} differ in length")
    stages = [(width, n, 2) for width, n in zip(widths, repeats, strict=True)]
    return IGCV2Net(stages, stem, in_channels, num_classes, levels=levels, **kwargs)


def igcv2_cifar(num_classes: int = 10, in_channels: int = 3, width: int = 240, **kwargs: Any) -> IGCV2Net:
    """Depth-20 CIFAR network calibrated to the paper's IGCV2*-C416 (0.65M parameters).

    Depth 20 counts, as in ResNet-20: 1 stem conv + 18 IGCV2 blocks (6 per stage, widths
    width/2width/4width at 32/16/8 pixels) + 1 classifier. Residual, L = 3. The paper's exact
    widths are not in what we have; width 240 (240/480/960) gives 0.650M parameters.
    """
    stages = [(width, 6, 1), (2 * width, 6, 2), (4 * width, 6, 2)]
    return IGCV2Net(stages, width, in_channels, num_classes, **kwargs)


# MobileNetV1's body as stage rows. The sparse 1x1 convs cost far less than MobileNet's dense
# ones, so at equal multiply-adds IGCV2 is wider; the widths (stem, stages) per multiplier are
# chosen so that MACs at 224x224 land on the paper's IGCV2-1.0 / 0.5 / 0.25 figures
# (564M / 156M / 46M): we get 554.1M / 158.6M / 46.3M, within 2%.
IMAGENET_WIDTHS: dict[float, tuple[int, tuple[int, int, int, int, int]]] = {
    1.0: (120, (240, 480, 960, 1920, 3840)),
    0.5: (48, (96, 192, 384, 768, 1536)),
    0.25: (32, (32, 64, 128, 256, 512)),
}


def igcv2_imagenet(width_mult: float = 1.0, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> IGCV2Net:
    """MobileNetV1-shaped ImageNet network (no residuals, stride-2 stem, 224x224 input)."""
    if width_mult not in IMAGENET_WIDTHS:
        raise ValueError(f"width_mult must be one of {sorted(IMAGENET_WIDTHS)}, got {width_mult}")
    stem, (c1, c2, c3, c4, c5) = IMAGENET_WIDTHS[width_mult]
    stages = [(c1, 1, 1), (c2, 2, 2), (c3, 2, 2), (c4, 6, 2), (c5, 2, 2)]
    kwargs.setdefault("residual", False)
    return IGCV2Net(stages, stem, in_channels, num_classes, stem_stride=2, **kwargs)


BUILDERS: dict[str, Callable[..., IGCV2Net]] = {
    "igcv2_fashion": igcv2_fashion,
    "igcv2_cifar": igcv2_cifar,
    "igcv2_imagenet": igcv2_imagenet,
}

# Named presets: builder, its kwargs, and the input size (C, H, W) the figures refer to.
PRESETS: dict[str, tuple[str, dict[str, Any], tuple[int, int, int]]] = {
    "fashion": ("igcv2_fashion", {}, (1, 28, 28)),
    "cifar10-c416": ("igcv2_cifar", {"num_classes": 10}, (3, 32, 32)),
    "imagenet-1.0": ("igcv2_imagenet", {"width_mult": 1.0}, (3, 224, 224)),
    "imagenet-0.5": ("igcv2_imagenet", {"width_mult": 0.5}, (3, 224, 224)),
    "imagenet-0.25": ("igcv2_imagenet", {"width_mult": 0.25}, (3, 224, 224)),
}


def build(builder: str, **kwargs: Any) -> IGCV2Net:
    """Build a network by builder name (the form stored in an artifact's config.json)."""
    if builder not in BUILDERS:
        raise ValueError(f"unknown builder {builder!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[builder](**kwargs)


class Normalized(nn.Module):
    """A network that takes uint8 NHWC images, as they come off the decoder, and normalises
    them itself: (x / 255 - mean) / std, then NCHW. Training, evaluation and serving all call
    this, so the arithmetic is identical everywhere, and the service ships 4x fewer bytes to
    the device than float32 would (the division runs inside the compiled graph)."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)]).view(1, -1, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(self.scale.dtype)
        return self.network(x * self.scale - self.shift)
