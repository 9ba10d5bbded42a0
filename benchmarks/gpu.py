"""python -m benchmarks.gpu: the GPU path in process, against a computed floor (issue 8).

``compare``: for each model (``igcv2-fashion``, the untrained ImageNet 1.0 preset at 224x224)
* the floor per image at each bucket: compute (2 x MACs at the device's measured dense matrix
  rate) and memory (input uint8 + logits + weights / batch + every conv output written and read
  once, at the measured copy bandwidth); the floor is the larger of the two;
* ``ModelRunner.predict`` (the service's own call: pinned uint8 upload, forward, logits back) per
  image at each bucket for every setting compared: eager and the torch.compile modes, fp16 vs
  bf16, channels_last vs not; with top-1 agreement against the float32 CPU reference.
Every setting compiles in its own process, all at once (compilation is CPU work), then each is
measured alone while the others wait, so the timings never share the GPU or the CPU.

Start-up times (cold and warm compile cache, torch.compile) are ``python -m benchmarks.startup``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.server import ROOT
from benchmarks.workloads import BUNDLED_STORE, fashion_pngs, latest_version_dir, photo_jpegs, untrained_imagenet

SETTINGS = [  # (compile mode or "eager", precision, channels_last); "aot:" + mode: ahead-of-time packages
    ("eager", "float16", False),
    ("default", "float16", False),
    ("reduce-overhead", "float16", False),
    ("aot:reduce-overhead", "float16", False),
    ("max-autotune", "float16", False),
    ("reduce-overhead", "bfloat16", False),
    ("reduce-overhead", "float16", True),
]
BUCKETS = {"fashion": [1, 8, 32, 128], "imagenet": [1, 8, 32]}


def model_dir(model: str, out: Path) -> Path:
    if model == "fashion":
        return latest_version_dir(BUNDLED_STORE, "igcv2-fashion")
    return latest_version_dir(untrained_imagenet(out / "store"), "igcv2-imagenet-untrained")


def encoded_images(model: str, n: int) -> list[bytes]:
    return [data for _, data in (fashion_pngs(n) if model == "fashion" else photo_jpegs(n))]


# ----- device and floor (parent process) -----


def device_rates(device: str) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and dense fp16/bf16 matrix rate, measured once."""
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn: Any, repeats: int) -> float:
        fn()
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - started) / repeats

    big = device == "cuda"
    src = torch.empty(2**30 if big else 2**26, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 20)
    out: dict[str, Any] = {"copy_bytes_per_s": 2 * src.numel() / copy_s}
    n = 8192 if big else 1024
    for dtype in (torch.float16, torch.bfloat16) if big else (torch.float32,):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out[f"matmul_flops_{str(dtype).removeprefix('torch.')}"] = 2 * n**3 / timed(lambda a=a, b=b: a @ b, 10)
    return out


def floor(version_dir: Path, rates: dict[str, Any], buckets: list[int]) -> dict[str, Any]:
    """MACs and the fewest bytes an image must move, and the time floor they imply at each bucket (fp16)."""
    import torch
    from torch import nn

    from igcv2.artifact import load_artifact
    from igcv2.complexity import count_macs

    artifact = load_artifact(version_dir)
    spec = artifact.config.input
    shape = (spec.channels, spec.height, spec.width)
    macs = count_macs(artifact.model, shape)
    conv_outputs = 0

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        nonlocal conv_outputs
        conv_outputs += output.numel()

    handles = [m.register_forward_hook(hook) for m in artifact.model.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        artifact.model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    half = 2
    weights = sum(p.numel() for p in artifact.model.parameters()) * half
    fixed = spec.channels * spec.height * spec.width + len(artifact.config.labels) * half + 2 * conv_outputs * half
    flops = rates.get("matmul_flops_float16") or rates.get("matmul_flops_float32")
    per_bucket = []
    for b in buckets:
        moved = fixed + weights / b
        compute_s, memory_s = 2 * macs / flops, moved / rates["copy_bytes_per_s"]
        per_bucket.append(
            {
                "batch": b,
                "bytes_per_image": moved,
                "compute_floor_us": 1e6 * compute_s,
                "memory_floor_us": 1e6 * memory_s,
                "floor_us_per_image": 1e6 * max(compute_s, memory_s),
            }
        )
    return {
        "macs_per_image": macs,
        "weight_bytes_fp16": weights,
        "conv_output_elements": conv_outputs,
        "input_bytes": spec.channels * spec.height * spec.width,
        "buckets": per_bucket,
    }


# ----- one setting (child process) -----


def child(config: dict[str, Any]) -> int:
    """Compile one setting, say so, wait for "go" on stdin, measure, print the result as JSON."""
    import torch

    from igcv2.artifact import load_artifact
    from igcv2.networks import Normalized
    from service.engine import softmax
    from service.imaging import decode_image
    from service.runtime import ModelRunner, RuntimeOptions

    mode, precision, channels_last = config["mode"], config["precision"], config["channels_last"]
    buckets: list[int] = config["buckets"]
    artifact = load_artifact(Path(config["model_dir"]))
    spec = artifact.config.input
    arrays = [decode_image(data, spec, 10**9) for data in encoded_images(config["model"], config["images"])]
    with torch.inference_mode():  # before ModelRunner, which moves the network to its device and dtype in place
        reference = (
            Normalized(artifact.model, spec.mean, spec.std)
            .eval()(torch.from_numpy(np.stack(arrays)))
            .softmax(1)
            .numpy()
        )
    aot, mode = mode.startswith("aot:"), mode.removeprefix("aot:")
    options = RuntimeOptions(
        device=torch.device(config["device"]),
        precision=precision,
        compile=mode != "eager",
        compile_mode=mode if mode != "eager" else "default",
        channels_last=channels_last,
        max_batch_size=buckets[-1],
        compile_cache=Path(tempfile.mkdtemp(prefix="aot-compare-")) if aot else None,  # empty: compile times are cold
    )
    runner = ModelRunner(artifact, options, name="compare")
    runner.buckets = buckets  # only the buckets compared (host buffers exist for every power of two)
    started = time.perf_counter()
    runner.executor.submit(runner.warmup).result()
    result: dict[str, Any] = {
        **{k: config[k] for k in ("model", "mode", "precision", "channels_last")},
        "compile_s": time.perf_counter() - started,
        "compiled": runner.compiled,
        "aot_packages": runner.packages,
    }
    print("compiled", json.dumps(result), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1

    def measure() -> dict[str, Any]:
        chunks = [runner.predict(arrays[i : i + buckets[-1]]) for i in range(0, len(arrays), buckets[-1])]
        probs = softmax(np.concatenate(chunks))
        out: dict[str, Any] = {
            "top1_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
            "max_probability_difference": float(np.abs(probs - reference).max()),
            "buckets": [],
        }
        if np.ptp(reference, axis=1).max() < 1e-6:  # untrained network with constant outputs: no ranking to agree on
            out["top1_agreement"] = None
        for b in buckets:
            batch = [arrays[i % len(arrays)] for i in range(b)]
            times: list[float] = []
            t_end = time.perf_counter() + config["seconds"]
            while len(times) < 20 or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                runner.predict(batch)
                times.append(time.perf_counter() - t0)
            call = float(np.median(times))
            out["buckets"].append(
                {
                    "batch": b,
                    "calls": len(times),
                    "ms_per_call": 1e3 * call,
                    "us_per_image": 1e6 * call / b,
                    "images_per_s": b / call,
                }
            )
        return out

    result |= runner.executor.submit(measure).result()
    runner.close()
    print("result", json.dumps(result), flush=True)
    return 0


# ----- the comparison (parent process) -----


class Child:
    def __init__(self, config: dict[str, Any], env: dict[str, str], log: Path) -> None:
        self.config = config
        self.lines: queue.Queue[str] = queue.Queue()
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.gpu", "child", json.dumps(config)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")

    def expect(self, word: str, deadline: float) -> dict[str, Any] | None:
        while True:  # a line already waiting counts even when the deadline has passed
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if not line:
                return None
            if line.startswith(word + " "):
                return json.loads(line.split(" ", 1)[1])

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


def compare(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device
    result: dict[str, Any] = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result |= {
            "card": props.name,
            "multiprocessors": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda,
        }
    result["rates"] = device_rates(device)
    print(json.dumps(result), flush=True)
    models = args.models.split(",")
    dirs = {m: model_dir(m, args.out) for m in models}
    buckets = {m: args.buckets or BUCKETS[m] for m in models}
    result["floors"] = {m: floor(dirs[m], result["rates"], buckets[m]) for m in models}
    cache = tempfile.mkdtemp(prefix="inductor-compare-")  # fresh: compile times are cold times
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": cache,
        "TORCHINDUCTOR_COMPILE_THREADS": str(args.compile_threads),
        "PYTHONUNBUFFERED": "1",
    }
    settings = [s for s in SETTINGS if s[0] in args.modes.split(",")]
    children = []
    for m in models:
        for mode, precision, channels_last in settings:
            config = {
                "model": m,
                "model_dir": str(dirs[m]),
                "mode": mode,
                "precision": precision,
                "channels_last": channels_last,
                "buckets": buckets[m],
                "device": device,
                "images": 512 if m == "fashion" else 8,
                "seconds": args.seconds,
            }
            tag = f"{m}-{mode}-{precision}-{'cl' if channels_last else 'nchw'}"
            children.append(Child(config, env, args.out / f"{tag}.log"))
    deadline = time.monotonic() + args.compile_timeout
    compiled = [c.expect("compiled", deadline) for c in children]
    runs = []
    for c, info in zip(children, compiled, strict=True):
        entry = {k: c.config[k] for k in ("model", "mode", "precision", "channels_last")}
        if info is None:
            entry["error"] = f"not compiled within {args.compile_timeout:.0f}s (or crashed): see its log"
        else:
            c.go()
            measured = c.expect("result", time.monotonic() + 120)
            entry = measured or {**info, "error": "measurement failed: see its log"}
        c.stop()
        runs.append(entry)
        print(json.dumps(entry), flush=True)
    result["runs"] = runs
    for m in models:
        for run in runs:
            if run["model"] == m and "buckets" in run:
                for b, f in zip(run["buckets"], result["floors"][m]["buckets"], strict=True):
                    b["floor_ratio"] = b["us_per_image"] / f["floor_us_per_image"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="floor, compile modes, precisions and memory formats")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    p.add_argument("--models", default="fashion,imagenet")
    p.add_argument(
        "--modes",
        default="eager,default,reduce-overhead",
        help="comma-separated; add max-autotune to compare it (minutes of compilation per bucket), and "
        "aot:reduce-overhead for ahead-of-time packages replayed as CUDA graphs (the service's default)",
    )
    p.add_argument("--buckets", type=lambda s: [int(v) for v in s.split(",")], help="override the buckets")
    p.add_argument("--seconds", type=float, default=0.5, help="timed seconds per bucket")
    p.add_argument("--compile-timeout", type=float, default=240.0, help="seconds all settings get to compile")
    p.add_argument("--compile-threads", type=int, default=4, help="inductor compile workers per setting")
    k = sub.add_parser("child", help=argparse.SUPPRESS)
    k.add_argument("config")
    args = parser.parse_args(argv)
    if args.command == "child":
        return child(json.loads(args.config))
    args.out.mkdir(parents=True, exist_ok=True)
    result = compare(args)
    (args.out / f"{args.command}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
