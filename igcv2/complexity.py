"""Parameter and multiply-add (MAC) counts.

MACs follow the convention of the IGCV2 / MobileNet / ShuffleNet papers ("FLOPs" there):
one multiply-add per weight use in convolutions and linear layers; BatchNorm, activations,
pooling and additions are not counted. They are measured by running the real module once
on a zero tensor with forward hooks, so any network counts, not only our presets.
"""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Trainable and non-trainable parameters (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-adds of one forward pass for one image of shape ``(C, H, W)``."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
