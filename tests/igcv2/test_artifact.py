"""Model store artifacts: round trip, version numbering, and a precise error for each way to break one."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import igcv2.artifact as artifact_module
from igcv2.artifact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactConfig,
    ArtifactError,
    load_artifact,
    read_config,
    save_artifact,
    sha256_file,
    versions,
)
from igcv2.complexity import count_macs, count_params
from igcv2.data import FASHION_MNIST_LABELS
from igcv2.networks import build

torch.set_num_threads(1)

FASHION_INPUT = {"height": 28, "width": 28, "channels": 1, "mean": [0.286], "std": [0.353]}
ARCH = {"builder": "igcv2_fashion", "kwargs": {"num_classes": 10, "in_channels": 1}}


def trained_looking_model(seed: int = 0) -> torch.nn.Module:
    """A fashion network with random BN statistics and affine parameters, so outputs depend on every tensor."""
    torch.manual_seed(seed)
    net = build(ARCH["builder"], **ARCH["kwargs"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    torch.nn.init.normal_(net.classifier.weight)
    return net.eval()


def save(model_dir: Path, model: torch.nn.Module | None = None, **overrides: Any) -> Path:
    kwargs: dict[str, Any] = {
        "name": "igcv2-fashion",
        "architecture": ARCH,
        "labels": FASHION_MNIST_LABELS,
        "input_spec": FASHION_INPUT,
        "metrics": {"dataset": "fashion-mnist", "split": "test", "top1": 0.5, "n": 10},
        "training": {"command": "python -m igcv2.train", "epochs": 1, "wall_time_s": 1.0},
    }
    kwargs.update(overrides)
    return save_artifact(model if model is not None else trained_looking_model(), model_dir, **kwargs)


def edit_config(version_dir: Path, change: Any) -> None:
    path = version_dir / CONFIG_FILE
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    return save(tmp_path / "igcv2-fashion")


def test_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    model = trained_looking_model()
    target = save(tmp_path / "igcv2-fashion", model)
    assert target == tmp_path / "igcv2-fashion" / "1"
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = load_artifact(target)
    assert not loaded.model.training
    assert loaded.path == target
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    # A freshly initialised network of the same shape gives different outputs: the weights were really loaded.
    with torch.no_grad():
        assert not torch.allclose(trained_looking_model(seed=1)(x), model(x))


def test_config_holds_the_contract_fields(artifact_dir: Path) -> None:
    raw = json.loads((artifact_dir / CONFIG_FILE).read_text())
    for field in ("name", "version", "architecture", "labels", "input", "weights_sha256", "params", "macs", "metrics"):
        assert field in raw, field
    assert raw["name"] == "igcv2-fashion" and raw["version"] == 1
    assert raw["architecture"] == ARCH
    assert raw["labels"] == FASHION_MNIST_LABELS
    assert raw["input"] == FASHION_INPUT
    assert raw["weights_sha256"] == sha256_file(artifact_dir / WEIGHTS_FILE)
    net = build(ARCH["builder"], **ARCH["kwargs"])
    assert raw["params"] == count_params(net)
    assert raw["macs"] == count_macs(net, (1, 28, 28))
    assert raw["metrics"]["top1"] == 0.5
    assert raw["training"]["epochs"] == 1
    config = read_config(artifact_dir)
    assert config.input.shape() == (1, 28, 28)


def test_weights_file_is_plain_safetensors(artifact_dir: Path) -> None:
    data = (artifact_dir / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert "classifier.weight" in header
    classifier = build(ARCH["builder"], **ARCH["kwargs"]).classifier
    assert header["classifier.weight"]["shape"] == list(classifier.weight.shape)
    assert header["classifier.weight"]["dtype"] == "F32"


def test_versions_count_up(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model = trained_looking_model()
    assert versions(model_dir) == []
    assert save(model_dir, model).name == "1"
    assert save(model_dir, model).name == "2"
    (model_dir / "notes").mkdir()  # not a version
    (model_dir / "0").mkdir()  # versions are positive
    (model_dir / "7.txt").write_text("")
    assert versions(model_dir) == [1, 2]
    assert save(model_dir, model, version=5).name == "5"
    assert save(model_dir, model).name == "6"
    assert versions(model_dir) == [1, 2, 5, 6]
    assert load_artifact(model_dir / "6").config.version == 6
    with pytest.raises(FileExistsError, match="already exists"):
        save(model_dir, model, version=2)
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")], "no temporary folder is left behind"


def test_missing_config(artifact_dir: Path) -> None:
    (artifact_dir / CONFIG_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"^missing {re.escape(str(artifact_dir / CONFIG_FILE))}$"):
        load_artifact(artifact_dir)


def test_missing_version_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"missing .*config\.json"):
        load_artifact(tmp_path / "nope" / "1")


def test_missing_weights(artifact_dir: Path) -> None:
    (artifact_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"^missing {re.escape(str(artifact_dir / WEIGHTS_FILE))}$"):
        load_artifact(artifact_dir)


def test_checksum_mismatch(artifact_dir: Path) -> None:
    weights = artifact_dir / WEIGHTS_FILE
    expected = sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch") as info:
        load_artifact(artifact_dir)
    message = str(info.value)
    assert str(weights) in message
    assert expected in message and sha256_file(weights) in message


def test_weights_swapped_after_the_checksum_are_not_loaded(
    artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is replaced right after its digest is taken: what loads must be what was hashed."""
    weights = artifact_dir / WEIGHTS_FILE
    other = save(tmp_path / "other", trained_looking_model(seed=1)) / WEIGHTS_FILE
    real_sha256 = hashlib.sha256

    class SwapAfterDigest:
        def __init__(self, *data: bytes) -> None:
            self.digest = real_sha256(*data)

        def update(self, data: bytes) -> None:
            self.digest.update(data)

        def hexdigest(self) -> str:
            weights.write_bytes(other.read_bytes())
            return self.digest.hexdigest()

    monkeypatch.setattr(artifact_module, "hashlib", SimpleNamespace(sha256=SwapAfterDigest))
    loaded = load_artifact(artifact_dir).model.state_dict()
    assert weights.read_bytes() == other.read_bytes(), "the swap happened"
    for name, tensor in trained_looking_model().state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_unreadable_weights(artifact_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ArtifactError, match=f"^cannot read {re.escape(str(artifact_dir / WEIGHTS_FILE))}: "):
        load_artifact(artifact_dir)


def test_invalid_json(artifact_dir: Path) -> None:
    (artifact_dir / CONFIG_FILE).write_text('{"name": "igcv2-fashion",')
    with pytest.raises(ArtifactError, match="is not valid JSON") as info:
        load_artifact(artifact_dir)
    assert str(artifact_dir / CONFIG_FILE) in str(info.value)


@pytest.mark.parametrize("field", ["labels", "architecture", "input", "weights_sha256", "version"])
def test_config_missing_a_field(artifact_dir: Path, field: str) -> None:
    edit_config(artifact_dir, lambda c: c.pop(field))
    with pytest.raises(ArtifactError, match=f"is invalid: {field}: Field required") as info:
        load_artifact(artifact_dir)
    assert str(artifact_dir / CONFIG_FILE) in str(info.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c["input"].update(channels=2), "input.channels"),
        (lambda c: c["input"].update(height=0), "input.height"),
        (lambda c: c.update(version=0), "version"),
        (lambda c: c.update(labels=[]), "labels"),
        (lambda c: c.update(name="../x"), "name: Value error, model name '../x' must match"),
        (lambda c: c["input"].update(mean=[0.1, 0.2, 0.3]), "input: Value error, mean and std need one value per"),
        (lambda c: c["input"].update(mean=[], std=[]), r"one value per channel \(1\), got 0 and 0"),
        (lambda c: c["input"].update(std=[0]), r"input\.std\.0: Input should be greater than 0"),
        (lambda c: c["input"].update(std=[float("inf")]), r"input\.std\.0: Input should be a finite number"),
    ],
)
def test_config_with_bad_values(artifact_dir: Path, change: Any, match: str) -> None:
    edit_config(artifact_dir, change)
    with pytest.raises(ArtifactError, match=match):
        load_artifact(artifact_dir)


def test_unknown_builder(artifact_dir: Path) -> None:
    edit_config(artifact_dir, lambda c: c["architecture"].update(builder="resnet50"))
    with pytest.raises(ArtifactError, match="cannot build architecture: unknown builder 'resnet50'"):
        load_artifact(artifact_dir)


def test_bad_builder_kwargs(artifact_dir: Path) -> None:
    edit_config(artifact_dir, lambda c: c["architecture"]["kwargs"].update(colour="blue"))
    with pytest.raises(ArtifactError, match="cannot build architecture"):
        load_artifact(artifact_dir)


def test_num_classes_that_cannot_be_built(artifact_dir: Path) -> None:
    """torch raises RuntimeError for a negative size; it still comes out as an ArtifactError."""
    edit_config(artifact_dir, lambda c: c["architecture"]["kwargs"].update(num_classes=-1))
    with pytest.raises(ArtifactError, match="cannot build architecture"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(labels=["a", "b", "c"]), r"network gives \(10,\) outputs per image for 3 labels"),
        (
            lambda c: c["input"].update(channels=3, mean=[0.5] * 3, std=[0.5] * 3),
            "network does not take the input 3x28x28: ",
        ),
    ],
    ids=["labels", "channels"],
)
def test_config_that_does_not_fit_its_network(artifact_dir: Path, change: Any, match: str) -> None:
    """Each part of the config is valid on its own; only together with the network do they disagree."""
    edit_config(artifact_dir, change)
    config_file = re.escape(str(artifact_dir / CONFIG_FILE))
    with pytest.raises(ArtifactError, match=f"{config_file} does not fit its network: {match}"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"labels": ["a", "b", "c"]}, "3 labels"),
        ({"input_spec": {**FASHION_INPUT, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}}, "3x28x28"),
    ],
    ids=["labels", "channels"],
)
def test_save_refuses_a_config_that_does_not_fit(tmp_path: Path, overrides: dict[str, Any], match: str) -> None:
    model = trained_looking_model().train()
    with pytest.raises(ArtifactError, match=match):
        save(tmp_path / "m", model, **overrides)
    assert not (tmp_path / "m").exists(), "nothing is written"
    assert model.training, "the check leaves the model's mode alone"


def test_a_network_that_gives_no_tensor_does_not_fit() -> None:
    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.flatten(1)[:, :10], x

    spec = artifact_module.InputSpec.model_validate(FASHION_INPUT)
    with pytest.raises(ArtifactError, match="network gives a tuple, not a tensor of logits"):
        artifact_module.check_fits(Pair(), FASHION_MNIST_LABELS, spec)


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path) -> None:
    """Weights of one network with the config of another; the checksum is right, so only the fit fails."""
    fashion = save(tmp_path / "a")
    other = save(
        tmp_path / "b",
        build("igcv2_cifar", num_classes=10, in_channels=1, width=16),
        architecture={"builder": "igcv2_cifar", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 16}},
    )
    (fashion / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    edit_config(fashion, lambda c: c.update(weights_sha256=sha256_file(fashion / WEIGHTS_FILE)))
    with pytest.raises(ArtifactError, match="does not fit architecture igcv2_fashion") as info:
        load_artifact(fashion)
    assert str(fashion / WEIGHTS_FILE) in str(info.value)


def test_weights_with_a_wrong_shape(artifact_dir: Path) -> None:
    """Same keys, one tensor of another shape (a 12-class classifier for a 10-class config)."""
    state = {k: v.contiguous() for k, v in trained_looking_model().state_dict().items()}
    state["classifier.weight"] = torch.zeros(12, 384)
    state["classifier.bias"] = torch.zeros(12)
    weights = artifact_dir / WEIGHTS_FILE
    save_file(state, weights)
    edit_config(artifact_dir, lambda c: c.update(weights_sha256=sha256_file(weights)))
    with pytest.raises(ArtifactError, match=r"(?s)does not fit architecture.*size mismatch for classifier\.weight"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize(
    "garbage",
    [b"not a safetensors file at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......}", b""],
    ids=["text", "bad-header", "empty"],
)
def test_corrupt_safetensors_with_matching_checksum(artifact_dir: Path, garbage: bytes) -> None:
    weights = artifact_dir / WEIGHTS_FILE
    weights.write_bytes(garbage)
    edit_config(artifact_dir, lambda c: c.update(weights_sha256=sha256_file(weights)))
    with pytest.raises(ArtifactError, match="is not a readable safetensors file") as info:
        load_artifact(artifact_dir)
    assert str(weights) in str(info.value)


def test_truncated_safetensors_with_matching_checksum(artifact_dir: Path) -> None:
    weights = artifact_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    edit_config(artifact_dir, lambda c: c.update(weights_sha256=sha256_file(weights)))
    with pytest.raises(ArtifactError, match="is not a readable safetensors file"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "spaces here", "igcv2-fashion\n"])
def test_model_name_validation(tmp_path: Path, name: str) -> None:
    config = json.loads((save(tmp_path / "ok") / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="model name"):
        ArtifactConfig.model_validate({**config, "name": name})
    model_dir = tmp_path / "store" / "m"
    with pytest.raises(ValueError, match="model name"):
        save(model_dir, name=name)
    assert list(model_dir.iterdir()) == [], "a rejected artifact leaves nothing behind"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["igcv2-fashion", "m", "A.b_c-1", "x" * 64])
def test_good_model_names(name: str) -> None:
    assert (
        ArtifactConfig.model_validate(
            {
                "name": name,
                "version": 1,
                "architecture": ARCH,
                "labels": ["a"],
                "input": FASHION_INPUT,
                "weights_sha256": "0" * 64,
                "params": 1,
                "macs": 1,
            }
        ).name
        == name
    )


def test_unknown_config_keys_are_kept(artifact_dir: Path) -> None:
    edit_config(artifact_dir, lambda c: c.update(notes="kept"))
    assert load_artifact(artifact_dir).config.model_extra == {"notes": "kept"}
