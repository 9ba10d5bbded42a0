"""Train an IGCV2 network and write a model store artifact.

    python -m igcv2.train --dataset fashion-mnist --epochs 25 --out model_store/igcv2-fashion

SGD (Nesterov momentum) with weight decay, a one-cycle learning rate (linear warm-up, cosine
decay, computed from the step number so a resumed run continues exactly), augmentation that
fits the dataset, label smoothing, a checkpoint after every epoch (``--out/.checkpoint.pt``,
read back with ``weights_only=True``), mixed precision on CUDA. The finished artifact lands in
the next free version folder with its test accuracy, command, epochs and wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from igcv2.artifact import ArtifactError, InputSpec, check_fits, load_artifact, save_artifact
from igcv2.data import DATASETS, ArrayDataset, load_dataset
from igcv2.evaluate import non_negative, top1
from igcv2.networks import BUILDERS, Normalized, build

# Augmentation per dataset: (padding for random-shift crops, horizontal flips).
AUGMENT = {"fashion-mnist": (2, True), "mnist": (2, False), "cifar10": (4, True), "cifar100": (4, True)}
DEFAULT_BUILDER = {"fashion-mnist": "igcv2_fashion", "mnist": "igcv2_fashion", "cifar10": "igcv2_cifar",
                   "cifar100": "igcv2_cifar", "folder": "igcv2_cifar"}  # fmt: skip
CHECKPOINT = ".checkpoint.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random-shift crop (zero padding) and horizontal flip of a uint8 NHWC batch, vectorised."""
    n, h, w, _ = images.shape
    if pad:
        padded = F.pad(images, (0, 0, pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None])[:, :, None]
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, :]
        images = padded[torch.arange(n)[:, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(2), images)
    return images


def one_cycle(step: int, total: int, peak: float, warmup: float = 0.15) -> float:
    """Linear warm-up from peak/25 over the first ``warmup`` fraction, then cosine to ~0."""
    up = max(1, int(total * warmup))
    if step < up:
        return peak / 25 + (peak - peak / 25) * step / up
    progress = (step - up) / max(1, total - up)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) + 1e-5


def channel_stats(data: ArrayDataset) -> tuple[list[float], list[float]]:
    x = data.images.reshape(-1, data.images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).round(4).tolist(), x.std(0).round(4).tolist()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m igcv2.train", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", type=Path, default=None, help="overrides the dataset's default directory")
    p.add_argument("--out", type=Path, required=True, help="model folder, e.g. model_store/igcv2-fashion")
    p.add_argument("--name", default=None, help="model name (default: the --out folder name)")
    p.add_argument("--builder", choices=sorted(BUILDERS), default=None)
    p.add_argument("--builder-kwargs", type=json.loads, default={}, help="JSON object of builder arguments")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("C", "H", "W"),
        help="input size for image folders (default 3 32 32)",
    )
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=non_negative, default=None, help="train on the first N examples only (smoke runs)")
    p.add_argument("--eval-limit", type=non_negative, default=None, help="evaluate on the first N test examples only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:n]")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="train in channels_last memory format (faster for L = 2 blocks on CPU, slower for L = 3)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="fine-tune: start from this artifact's architecture, weights and normalisation",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    command = "python -m igcv2.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    c, h, w = args.input_size or (3, 32, 32)
    train = load_dataset(args.dataset, "train", args.data_dir, (c, h, w))
    test = load_dataset(args.dataset, "test", args.data_dir, (c, h, w))
    if args.limit:
        train = train.subset(args.limit)
    if args.eval_limit:
        test = test.subset(args.eval_limit)
    _, h, w, c = train.images.shape
    base = load_artifact(args.init_from) if args.init_from else None
    if base is not None:
        builder, kwargs = base.config.architecture.builder, base.config.architecture.kwargs
        mean, std = base.config.input.mean, base.config.input.std
        network = base.model.train()
    else:
        mean, std = channel_stats(train)
        builder = args.builder or DEFAULT_BUILDER[args.dataset]
        kwargs = {"num_classes": len(train.classes), "in_channels": c, **args.builder_kwargs}
        network = build(builder, **kwargs)
    try:
        spec = InputSpec(height=h, width=w, channels=c, mean=mean, std=std)
        check_fits(network, train.classes, spec)  # before training, not when saving its result
    except (ArtifactError, ValueError) as exc:  # e.g. --init-from a 10-class model on a 3-class folder
        print(f"error: the network does not fit the data set: {exc}", file=sys.stderr)
        return 2
    model = Normalized(network, mean, std).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    decay, no_decay = [], []
    for _name, param in network.named_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)  # no decay on BN and biases
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=args.momentum,
        nesterov=True,
    )
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.out / CHECKPOINT
    start_epoch, elapsed_before = 0, 0.0
    history: list[dict[str, Any]] = []
    # Everything that shapes the weights: a checkpoint of another recipe must not be continued.
    recipe = {"dataset": args.dataset, "data_dir": str(args.data_dir or ""), "classes": train.classes,
              "input": [c, h, w], "train_examples": len(train), "init_from": str(args.init_from or ""),
              "builder": builder, "kwargs": kwargs, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
              "label_smoothing": args.label_smoothing, "seed": args.seed}  # fmt: skip
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        differing = [f"{k} {state.get(k)!r} (now {v!r})" for k, v in recipe.items() if state.get(k) != v]
        if differing:
            print(
                f"error: {checkpoint_path} belongs to a different run: {', '.join(differing)}; delete it to start over",
                file=sys.stderr,
            )
            return 2
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, elapsed_before = int(state["epoch"]), float(state["elapsed"])
        history = list(state.get("history", []))  # older checkpoints have none
        print(f"resuming from {checkpoint_path} after epoch {start_epoch}")

    pad, flip = AUGMENT.get(args.dataset, (max(1, h // 8), True))
    images = torch.from_numpy(train.images)
    labels = torch.from_numpy(train.labels)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    for epoch in range(start_epoch, args.epochs):
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # same order on resume
        order = torch.randperm(len(train), generator=generator)
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            unit="batch",
            dynamic_ncols=True,
            mininterval=5.0 if not sys.stderr.isatty() else 0.1,
        )
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = one_cycle(step, total_steps, args.lr)
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = augment(images[idx], pad, flip, generator).to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            bar.set_postfix(
                refresh=False,
                loss=f"{loss_sum / seen:.4f}",
                acc=f"{correct / seen:.4f}",
                lr=f"{optimizer.param_groups[0]['lr']:.4f}",
            )
        bar.close()
        test_top1 = top1(model, test, device=str(device))
        elapsed = elapsed_before + time.time() - started
        history.append(
            {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen, "test_top1": test_top1}
        )
        print(
            f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f} acc {correct / seen:.4f}, "
            f"test top-1 {test_top1:.4f}, {elapsed / 60:.1f} min",
            flush=True,
        )
        state = {
            **recipe,
            "epoch": epoch + 1,
            "elapsed": elapsed,
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": history,
        }
        torch.save(state, checkpoint_path.with_suffix(".tmp"))
        os.replace(checkpoint_path.with_suffix(".tmp"), checkpoint_path)

    network.eval()
    final_top1 = top1(model, test, device=str(device))
    wall = elapsed_before + time.time() - started
    target = save_artifact(
        network.cpu(),
        args.out,
        name=args.name or args.out.name,
        architecture={"builder": builder, "kwargs": kwargs},
        labels=train.classes,
        input_spec=spec.model_dump(),
        metrics={"dataset": args.dataset, "split": "test", "top1": final_top1, "n": len(test)},
        training={
            "command": command,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": f"SGD nesterov momentum={args.momentum} weight_decay={args.weight_decay}",
            "lr_schedule": f"one-cycle peak {args.lr} (linear warm-up 15%, cosine decay)",
            "augmentation": f"random-shift crop pad {pad}" + (", horizontal flip" if flip else ""),
            "label_smoothing": args.label_smoothing,
            "seed": args.seed,
            "train_examples": len(train),
            "device": str(device),
            "torch": torch.__version__,
            "wall_time_s": round(wall, 1),
            "history": history,
            **({"init_from": str(args.init_from), "base_training": base.config.training} if base else {}),
        },
    )
    checkpoint_path.unlink(missing_ok=True)
    print(f"wrote {target} (test top-1 {final_top1:.4f}, {wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
