"""Training CLI smoke runs, in-process, on a subset of the real Fashion-MNIST train split."""

from __future__ import annotations

import json
import shlex
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from PIL import Image

import igcv2.train as train_module
from igcv2.artifact import load_artifact, save_artifact
from igcv2.data import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, load_dataset
from igcv2.evaluate import top1
from igcv2.networks import Normalized, build
from igcv2.train import CHECKPOINT, channel_stats, main, one_cycle, parse_args

torch.set_num_threads(1)

# A narrow residual network keeps the repeated runs quick; the first test uses the default builder.
TINY = ["--builder", "igcv2_cifar", "--builder-kwargs", '{"width": 8}']


def args(out: Path, *extra: str, limit: int = 256, epochs: int = 1) -> list[str]:
    return [
        "--dataset", "fashion-mnist", "--limit", str(limit), "--eval-limit", "200", "--epochs", str(epochs),
        "--threads", "1", "--out", str(out), *extra,
    ]  # fmt: skip


def read_config(version_dir: Path) -> dict:
    return json.loads((version_dir / "config.json").read_text())


def test_one_epoch_smoke_run_writes_versions_1_then_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "igcv2-smoke"
    argv = args(out)
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["1"], "only the version folder; the checkpoint is removed"
    config = read_config(out / "1")
    assert config["name"] == "igcv2-smoke" and config["version"] == 1
    assert config["architecture"] == {"builder": "igcv2_fashion", "kwargs": {"num_classes": 10, "in_channels": 1}}
    assert config["labels"] == FASHION_MNIST_LABELS
    assert config["input"]["height"] == config["input"]["width"] == 28 and config["input"]["channels"] == 1
    # Normalisation statistics of exactly the training images (the first 256), never of the test split.
    mean, std = channel_stats(load_dataset("fashion-mnist", "train").subset(256))
    assert (config["input"]["mean"], config["input"]["std"]) == (mean, std)
    metrics, training = config["metrics"], config["training"]
    assert metrics["dataset"] == "fashion-mnist" and metrics["split"] == "test" and metrics["n"] == 200
    assert 0.0 <= metrics["top1"] <= 1.0
    assert training["command"] == "python -m igcv2.train " + shlex.join(argv)
    assert training["epochs"] == 1
    assert training["train_examples"] == 256
    assert training["wall_time_s"] > 0
    assert [h["epoch"] for h in training["history"]] == [1]
    printed = capsys.readouterr().out
    assert "epoch 1: train loss" in printed and f"wrote {out / '1'}" in printed

    # The stored top-1 is the accuracy of the stored weights on the first 200 test images.
    artifact = load_artifact(out / "1")
    test = load_dataset("fashion-mnist", "test").subset(200)
    spec = artifact.config.input
    assert top1(Normalized(artifact.model, spec.mean, spec.std), test) == pytest.approx(metrics["top1"])

    assert main(args(out, *TINY, "--channels-last", limit=128)) == 0  # stored weights are plain contiguous
    assert sorted(p.name for p in out.iterdir()) == ["1", "2"]
    second = read_config(out / "2")
    assert second["version"] == 2
    assert second["architecture"]["builder"] == "igcv2_cifar"
    assert second["architecture"]["kwargs"] == {"num_classes": 10, "in_channels": 1, "width": 8}
    assert load_artifact(out / "2").config.params < artifact.config.params


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_from_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m"
    calls = []
    real_top1 = train_module.top1

    def stop_in_epoch_2(*a: object, **kw: object) -> float:
        calls.append(1)
        if len(calls) == 2:  # the end-of-epoch evaluation of epoch 2: epoch 1's checkpoint is on disk
            raise Interrupted
        return real_top1(*a, **kw)

    monkeypatch.setattr(train_module, "top1", stop_in_epoch_2)
    with pytest.raises(Interrupted):
        main(args(out, *TINY, limit=128, epochs=2))
    monkeypatch.undo()

    checkpoint = out / CHECKPOINT
    assert checkpoint.is_file()
    assert not (out / "1").exists()
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 1 and state["epochs"] == 2 and state["builder"] == "igcv2_cifar"
    capsys.readouterr()

    # A run with another recipe refuses the checkpoint instead of mixing two runs, and names what differs.
    for extra, limit, epochs, differs in [
        (TINY, 128, 3, "epochs 2 (now 3)"),
        (TINY, 64, 2, "train_examples 128 (now 64)"),
        ([*TINY, "--lr", "0.1"], 128, 2, "lr 0.2 (now 0.1)"),
        ([*TINY, "--batch-size", "64"], 128, 2, "batch_size 128 (now 64)"),
        ([*TINY, "--label-smoothing", "0"], 128, 2, "label_smoothing 0.1 (now 0.0)"),
        ([*TINY, "--seed", "1"], 128, 2, "seed 0 (now 1)"),
        ([*TINY, "--data-dir", str(FASHION_MNIST_DIR)], 128, 2, f"data_dir '' (now '{FASHION_MNIST_DIR}')"),
        ([*TINY[:-1], '{"width": 16}'], 128, 2, "kwargs {'num_classes': 10, 'in_channels': 1, 'width': 8} (now"),
    ]:
        assert main(args(out, *extra, limit=limit, epochs=epochs)) == 2, differs
        err = capsys.readouterr().err
        assert f"error: {checkpoint} belongs to a different run: {differs}" in err
        assert "Traceback" not in err
    assert checkpoint.is_file()

    assert main(args(out, *TINY, limit=128, epochs=2)) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {checkpoint} after epoch 1" in printed
    assert "epoch 1: train loss" not in printed, "epoch 1 must not be trained again"
    assert "epoch 2: train loss" in printed
    assert not checkpoint.exists()
    config = read_config(out / "1")
    assert config["training"]["epochs"] == 2
    assert [h["epoch"] for h in config["training"]["history"]] == [1, 2]
    assert config["training"]["wall_time_s"] > 0

    # Resuming continues exactly: same weights as a run that was never interrupted.
    assert main(args(tmp_path / "ref", *TINY, limit=128, epochs=2)) == 0
    resumed, straight = load_artifact(out / "1").model, load_artifact(tmp_path / "ref" / "1").model
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("option", ["--limit", "--eval-limit"])
def test_negative_limits_are_refused(tmp_path: Path, option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--out", str(tmp_path), option, "-5"])
    assert info.value.code == 2
    assert f"{option}: must be 0 or more, got -5" in capsys.readouterr().err
    assert getattr(parse_args(["--out", str(tmp_path), option, "0"]), option[2:].replace("-", "_")) == 0


def test_one_cycle_schedule_warms_up_then_decays() -> None:
    total, peak = 100, 0.2
    lrs = [one_cycle(s, total, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 25)
    top = max(range(total), key=lrs.__getitem__)
    assert top == 15 and lrs[top] == pytest.approx(peak, rel=1e-3)
    assert all(a <= b for a, b in pairwise(lrs[: top + 1]))
    assert all(a >= b for a, b in pairwise(lrs[top:]))
    assert lrs[-1] < peak / 100


def test_fine_tune_starts_from_an_artifact_and_records_its_recipe(tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert main(args(out, *TINY, "--channels-last", limit=128)) == 0  # stored weights are plain contiguous
    base = load_artifact(out / "1")
    assert main(args(out, "--init-from", str(out / "1"), "--lr", "0.001", limit=128)) == 0
    config = read_config(out / "2")
    assert config["architecture"] == base.config.architecture.model_dump()
    assert config["input"]["mean"] == base.config.input.mean
    assert config["training"]["init_from"] == str(out / "1")
    assert config["training"]["base_training"]["command"] == base.config.training["command"]
    tuned = load_artifact(out / "2").model.state_dict()
    moved = [k for k, v in base.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, tuned[k])]
    assert moved, "fine-tuning did not change any weight"


def test_fine_tune_on_a_data_set_the_base_does_not_fit_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 10-class base on a 3-class folder: refused up front, not after training, and nothing is written."""
    base = save_artifact(
        build("igcv2_fashion"), tmp_path / "base", name="base", architecture={"builder": "igcv2_fashion"},
        labels=FASHION_MNIST_LABELS, untrained=True,
        input_spec={"height": 28, "width": 28, "channels": 1, "mean": [0.286], "std": [0.353]},
    )  # fmt: skip
    for split in ("train", "test"):
        for name in ("cat", "dog", "fox"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("L", (28, 28)).save(tmp_path / "data" / split / name / "x.png")
    out = tmp_path / "tuned"
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--input-size", "1", "28", "28",
            "--init-from", str(base), "--epochs", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "error: the network does not fit the data set: network gives (10,) outputs per image for 3 labels" in (
        captured.err
    )
    assert "epoch 1" not in captured.out
    assert not out.exists()
