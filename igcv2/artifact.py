"""Model store artifacts: ``<store>/<name>/<version>/config.json`` + ``model.safetensors`` (igcv2.store).

The weights are safetensors only (nothing here unpickles); ``config.json`` carries what is
needed to rebuild the network (builder + kwargs), to feed it (input spec) and to explain it
(labels, metrics, training recipe). The SHA-256 of the weights file is checked on every load.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_weights
from safetensors.torch import save_file
from torch import nn

from igcv2.complexity import count_macs, count_params
from igcv2.networks import build
from igcv2.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Architecture,
    ArtifactConfig,
    ArtifactError,
    InputSpec,
    read_config,
    sha256_file,
    versions,
)


@dataclass
class Artifact:
    config: ArtifactConfig
    model: nn.Module
    path: Path


def check_fits(model: nn.Module, labels: list[str], spec: InputSpec) -> None:
    """Run one zero batch of the input shape: the network must take it and give one logit per label.

    Builder kwargs, labels and input spec are written independently, so nothing else ties them
    together; a mismatch would otherwise surface only on the first request (or as wrong labels).
    """
    probe = next(model.parameters(), torch.empty(0))
    training = model.training
    try:
        with torch.inference_mode():
            out = model.eval()(torch.zeros(1, *spec.shape(), dtype=probe.dtype, device=probe.device))
    except Exception as exc:  # whatever a network raises on a wrong input, the artifact is at fault
        raise ArtifactError(f"network does not take the input {'x'.join(map(str, spec.shape()))}: {exc}") from exc
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor):
        raise ArtifactError(f"network gives a {type(out).__name__}, not a tensor of logits")
    if tuple(out.shape) != (1, len(labels)):
        raise ArtifactError(f"network gives {tuple(out.shape)[1:]} outputs per image for {len(labels)} labels")


def load_artifact(path: Path) -> Artifact:
    """Load one version folder: validate config, check the checksum, rebuild, load weights."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"missing {weights}")
    try:
        data = weights.read_bytes()  # hashed and parsed from these bytes: a file swapped in between is never loaded
    except OSError as exc:
        raise ArtifactError(f"cannot read {weights}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != config.weights_sha256:
        raise ArtifactError(f"checksum mismatch for {weights}: config says {config.weights_sha256}, file is {actual}")
    try:
        model = build(config.architecture.builder, **config.architecture.kwargs)
    except Exception as exc:  # kwargs reach arbitrary constructors: e.g. num_classes=-1 is a RuntimeError
        raise ArtifactError(f"{path / CONFIG_FILE}: cannot build architecture: {exc}") from exc
    try:
        state = load_weights(data)
    except SafetensorError as exc:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights} does not fit architecture {config.architecture.builder}: {exc}") from exc
    try:
        check_fits(model, config.labels, config.input)
    except ArtifactError as exc:
        raise ArtifactError(f"{path / CONFIG_FILE} does not fit its network: {exc}") from exc
    return Artifact(config, model.eval(), path)


def save_artifact(
    model: nn.Module,
    model_dir: Path,
    *,
    name: str,
    architecture: dict[str, Any],
    labels: list[str],
    input_spec: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
    untrained: bool = False,
    version: int | None = None,
) -> Path:
    """Write the next free version (or ``version``) of ``model`` under ``model_dir``.

    The folder is written under a temporary name and renamed, so a reader never sees half an
    artifact.
    """
    model_dir = Path(model_dir)
    version = version or (max(versions(model_dir), default=0) + 1)
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    spec = InputSpec.model_validate(input_spec)
    check_fits(model, labels, spec)  # refuse to write an artifact that load_artifact would refuse
    tmp = model_dir / f".{version}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE)
        config = ArtifactConfig(
            name=name,
            version=version,
            architecture=Architecture.model_validate(architecture),
            labels=labels,
            input=spec,
            weights_sha256=sha256_file(tmp / WEIGHTS_FILE),
            params=count_params(model),
            macs=count_macs(model, spec.shape()),
            metrics=metrics,
            training=training,
            serving=serving or {},
            untrained=untrained,
        )
        (tmp / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an invalid name or spec leaves no half-written folder behind
        raise
    return target
