"""Evaluate a model store artifact on a dataset split; prints top-1 and writes nothing.

python -m igcv2.evaluate model_store/igcv2-fashion/1 --dataset fashion-mnist --split test [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from igcv2.artifact import ArtifactConfig, ArtifactError, load_artifact
from igcv2.data import DATASETS, ArrayDataset, DatasetError, load_dataset
from igcv2.networks import Normalized


def non_negative(text: str) -> int:
    """An argparse type for counts: a negative --limit would slice from the end (-9990 of 10000 is 10)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 500, device: str = "cpu") -> torch.Tensor:
    """Logits of a :class:`Normalized` model for uint8 NHWC ``images``, in float32 on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        out.append(model(batch).float().cpu())
    return torch.cat(out)


def top1(model: nn.Module, data: ArrayDataset, device: str = "cpu") -> float:
    predictions = predict_logits(model, data.images, device=device).argmax(1).numpy()
    return float((predictions == data.labels).mean())


def check_matches(data: ArrayDataset, config: ArtifactConfig) -> None:
    """Refuse a data set the model was not made for: its images would be misread (the network may
    even run on another size and give a meaningless top-1), its labels read as other classes."""
    _, height, width, channels = data.images.shape
    if (channels, height, width) != config.input.shape():
        raise DatasetError(
            f"the data set's images are {channels}x{height}x{width} (CxHxW), "
            f"the model takes {'x'.join(map(str, config.input.shape()))}"
        )
    if len(data.classes) != len(config.labels):
        raise DatasetError(f"the data set has {len(data.classes)} classes, the model {len(config.labels)} labels")
    for i, (ours, theirs) in enumerate(zip(data.classes, config.labels, strict=True)):
        if ours != theirs:
            raise DatasetError(f"class {i} is {ours!r} in the data set but {theirs!r} in the model's labels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igcv2.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="version folder, e.g. model_store/igcv2-fashion/1")
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path, default=None, help="overrides the dataset's default directory")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--limit", type=non_negative, default=None, help="evaluate only the first N examples (0: all)")
    parser.add_argument("--json", action="store_true", help='print {"top1": ..., "n": ...}')
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        artifact = load_artifact(args.artifact)
        spec = artifact.config.input
        data = load_dataset(args.dataset, args.split, args.data_dir, spec.shape(), artifact.config.labels)
        check_matches(data, artifact.config)
    except (ArtifactError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        data = data.subset(args.limit)
    accuracy = top1(Normalized(artifact.model, spec.mean, spec.std), data)
    if args.json:
        print(json.dumps({"top1": accuracy, "n": len(data)}))
    else:
        print(
            f"{artifact.config.name} v{artifact.config.version} on {args.dataset} {args.split}: "
            f"top-1 {accuracy:.4f} ({len(data)} images)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
