"""Shared fixtures of the service unit tests: a clean IGCV2_* environment and small real models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from igcv2.artifact import Artifact, ArtifactConfig
from igcv2.networks import IGCV2Net

TINY_INPUT = {"height": 12, "width": 12, "channels": 1, "mean": [0.4], "std": [0.3]}


@pytest.fixture(scope="module", autouse=True)
def clean_env() -> Iterator[None]:
    """No IGCV2_* variable of the developer's shell leaks into a test (module fixtures included: an
    autouse fixture runs before the others of its scope); tests set their own with ``monkeypatch``."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("IGCV2_"):
                patch.delenv(name)
        patch.setenv("IGCV2_GRPC_PORT", "0")  # an app under test serves no gRPC on Triton's port unless asked
        yield


def randomise(net: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics and affine parameters, so every tensor shapes the output (as after training)."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net.eval()


def tiny_net(seed: int = 0, channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A real IGCV2 network small enough to compile in seconds: 3x3 stem (8) + one L=3 unit (16, stride 2)."""
    return randomise(IGCV2Net([(16, 1, 2)], 8, in_channels=channels, num_classes=num_classes), seed)


def tiny_artifact(seed: int = 0, **input_overrides: Any) -> Artifact:
    """An in-memory artifact around :func:`tiny_net` (ModelRunner needs only the config and the module)."""
    spec = {**TINY_INPUT, **input_overrides}
    config = ArtifactConfig(
        name="tiny",
        version=1,
        architecture={"builder": "igcv2_fashion"},
        labels=[f"class{i}" for i in range(10)],
        input=spec,
        weights_sha256="0" * 64,
        params=0,
        macs=0,
    )
    return Artifact(config, tiny_net(seed, spec["channels"]), Path("tiny/1"))


@pytest.fixture(scope="session")
def make_tiny_artifact() -> Callable[..., Artifact]:
    """:func:`tiny_artifact` as a fixture (test modules cannot import this conftest under importlib mode)."""
    return tiny_artifact


@pytest.fixture(scope="session")
def make_tiny_net() -> Callable[..., nn.Module]:
    return tiny_net
