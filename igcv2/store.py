"""The model store's layout and the contract of each version's ``config.json``, readable without torch.

``<store>/<name>/<version>/config.json`` + ``model.safetensors`` (igcv2.artifact writes and loads them).
A serving front-end reads configs and lists versions here without ever building a network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from igcv2.names import MODEL_NAME, VERSION_TEXT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ArtifactError(ValueError):
    """An artifact cannot be loaded; the message names the file and the reason."""


class Architecture(BaseModel):
    builder: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class InputSpec(BaseModel):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: int = Field(ge=1, le=3)
    mean: list[Annotated[float, Field(allow_inf_nan=False)]]
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]  # divided by: zero would fail only at inference

    @field_validator("channels")
    @classmethod
    def _one_or_three(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        return v

    @model_validator(mode="after")
    def _one_statistic_per_channel(self) -> InputSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need one value per channel ({self.channels}), got {len(self.mean)} and {len(self.std)}"
            )
        return self

    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width


class ArtifactConfig(BaseModel):
    """The contract of ``config.json`` (DESIGN.md section 3); unknown keys are kept."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int = Field(gt=0)
    architecture: Architecture
    labels: list[str] = Field(min_length=1)
    input: InputSpec
    weights_sha256: str
    params: int
    macs: int
    metrics: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    serving: dict[str, Any] = Field(default_factory=dict)
    untrained: bool = False

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not MODEL_NAME.fullmatch(v):
            raise ValueError(f"model name {v!r} must match {MODEL_NAME.pattern}")
        return v


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions(model_dir: Path) -> list[int]:
    """Integer version folders present under a model directory, ascending."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and VERSION_TEXT.fullmatch(p.name))


def read_config(path: Path) -> ArtifactConfig:
    """Read and validate ``config.json`` of one version folder."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise ArtifactError(f"missing {config_path}")
    try:
        return ArtifactConfig.model_validate(json.loads(config_path.read_text()))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config_path} is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ArtifactError(f"{config_path} is invalid: {problems}") from exc
