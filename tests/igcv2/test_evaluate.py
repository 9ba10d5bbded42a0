"""``python -m igcv2.evaluate``: prints top-1 (JSON on request), writes nothing, fails clearly."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from igcv2.artifact import WEIGHTS_FILE, load_artifact, save_artifact
from igcv2.data import FASHION_MNIST_LABELS, load_dataset
from igcv2.evaluate import main, non_negative, predict_logits, top1
from igcv2.networks import Normalized, build

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
FASHION_INPUT = {"height": 28, "width": 28, "channels": 1, "mean": [0.286], "std": [0.353]}


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-m", "igcv2.evaluate", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(folder)) + "/": (0, 0, "") for p in folder.rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = build("igcv2_fashion")
    # Make the untrained network's predictions spread over classes, so top-1 is not a constant.
    torch.nn.init.normal_(net.classifier.weight)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    return save_artifact(
        net,
        tmp_path_factory.mktemp("store") / "igcv2-fashion",
        name="igcv2-fashion",
        architecture={"builder": "igcv2_fashion", "kwargs": {}},
        labels=FASHION_MNIST_LABELS,
        input_spec=FASHION_INPUT,
        untrained=True,
    )


def test_json_output_and_nothing_written(artifact: Path) -> None:
    before = snapshot(artifact.parent.parent)
    result = run_cli(str(artifact), "--json", "--limit", "500")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"top1", "n"}
    assert report["n"] == 500
    assert 0.0 <= report["top1"] <= 1.0
    assert snapshot(artifact.parent.parent) == before, "evaluate must not write into the model store"

    # The figure is the accuracy of this artifact on the first 500 test images, computed independently.
    loaded = load_artifact(artifact)
    data = load_dataset("fashion-mnist", "test").subset(500)
    with torch.no_grad():
        logits = loaded.model((torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255 - 0.286) / 0.353)
    expected = float((logits.argmax(1).numpy() == data.labels).mean())
    assert report["top1"] == pytest.approx(expected)
    assert report["top1"] == pytest.approx(top1(Normalized(loaded.model, [0.286], [0.353]), data))


def test_bad_path_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model" / "3"
    result = run_cli(str(missing), "--json")
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert str(missing / "config.json") in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists()


def test_human_readable_output(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(artifact), "--limit", "100", "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("igcv2-fashion v1 on fashion-mnist train: top-1 ")
    assert out.rstrip().endswith("(100 images)")


def test_broken_artifact_and_missing_data_fail_cleanly(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    for f in artifact.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert main([str(broken), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: checksum mismatch" in captured.err

    empty = tmp_path / "no-data"
    empty.mkdir()
    assert main([str(artifact), "--data-dir", str(empty)]) == 2
    assert "error: IDX file not found" in capsys.readouterr().err


def test_data_set_with_other_classes_is_refused(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same images, other class names: a top-1 would compare predictions with the wrong classes."""
    renamed = save_artifact(
        load_artifact(artifact).model, tmp_path / "m", name="m", architecture={"builder": "igcv2_fashion"},
        labels=[f"c{i}" for i in range(10)], input_spec=FASHION_INPUT, untrained=True,
    )  # fmt: skip
    assert main([str(renamed), "--limit", "10"]) == 2
    assert "error: class 0 is 'T-shirt/top' in the data set but 'c0' in the model's labels" in capsys.readouterr().err


def test_image_folder_is_numbered_by_the_model_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A test folder lacking a class needs no train split: its classes take the ids of the model's labels."""
    torch.manual_seed(0)
    labels = ["cat", "dog", "fox"]
    model = save_artifact(
        build("igcv2_fashion", num_classes=3), tmp_path / "m", name="m",
        architecture={"builder": "igcv2_fashion", "kwargs": {"num_classes": 3}},
        labels=labels, input_spec=FASHION_INPUT, untrained=True,
    )  # fmt: skip
    for name in ("cat", "fox"):
        (tmp_path / "data" / "test" / name).mkdir(parents=True)
        Image.new("L", (28, 28), 200).save(tmp_path / "data" / "test" / name / "x.png")
    folder = ["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--json"]
    assert main([str(model), *folder]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    (tmp_path / "data" / "test" / "wolf").mkdir()
    assert main([str(model), *folder]) == 2
    assert "has classes ['wolf'] that are not among the known classes ['cat', 'dog', 'fox']" in capsys.readouterr().err


def test_data_set_with_another_image_shape_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 3x32x32 network runs on 1x28x28 images too (global pooling): the top-1 would be noise."""
    cifar = save_artifact(
        build("igcv2_cifar", width=8), tmp_path / "m", name="m",
        architecture={"builder": "igcv2_cifar", "kwargs": {"width": 8}}, labels=FASHION_MNIST_LABELS,
        input_spec={"height": 32, "width": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}, untrained=True,
    )  # fmt: skip
    assert main([str(cifar), "--limit", "10"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: the data set's images are 1x28x28 (CxHxW), the model takes 3x32x32" in captured.err


@pytest.mark.parametrize("limit", ["-9990", "-1"])
def test_negative_limit_is_refused(artifact: Path, limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A negative limit used to slice from the end: -9990 evaluated the first 10 images."""
    with pytest.raises(SystemExit) as info:
        main([str(artifact), "--limit", limit])
    assert info.value.code == 2
    assert f"--limit: must be 0 or more, got {limit}" in capsys.readouterr().err
    assert non_negative("0") == 0  # 0 still means all


def test_predict_logits_uses_running_statistics_even_for_a_model_in_train_mode() -> None:
    """Batch statistics would make an image's logits depend on the rest of its batch."""
    torch.manual_seed(0)
    net = build("igcv2_fashion")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model = Normalized(net, [0.286], [0.353])
    images = load_dataset("fashion-mnist", "test").subset(8).images
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = torch.cat([reference(torch.from_numpy(images[i : i + 1])) for i in range(len(images))])
    logits = predict_logits(model.train(), images, batch_size=4)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
