"""The eager reference the compiled runners are held to: random uint8 images, and the artifact's own
network on exactly those images, unpadded, in float32."""

from __future__ import annotations

import numpy as np
import torch

from igcv2.artifact import Artifact
from igcv2.networks import Normalized


def images(n: int, shape: tuple[int, int, int] = (12, 12, 1), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def eager_logits(artifact: Artifact, batch: list[np.ndarray]) -> np.ndarray:
    spec = artifact.config.input
    with torch.inference_mode():
        return Normalized(artifact.model, spec.mean, spec.std).eval()(torch.from_numpy(np.stack(batch))).numpy()
