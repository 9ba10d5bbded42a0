"""The in-process ceiling: decode + forward with the service's own code, no HTTP, no queue.

Run as its own process (``python -m benchmarks.inprocess``) by :mod:`benchmarks.run`, with the
same IGCV2_* environment as the server, so it gets the same device, precision, compile mode,
thread count and batch buckets; the orchestrator never imports torch's compiled graphs itself.

What it measures, per batch bucket: images decoded with ``service.imaging.decode_image`` and
run through ``ModelRunner.predict`` (compiled, warmed up), one after the other on the runner's
own inference thread; the best bucket is the ceiling the HTTP service is compared against.
Then the single-image latency: decode + forward of one image, many times. And the decode
ceiling: images/s ``decode_image`` reaches alone on as many threads as the service decodes with
(what bounds a fast accelerator fed large JPEGs).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igcv2.artifact import load_artifact
from service.config import Settings
from service.imaging import decode_image
from service.runtime import ModelRunner, configure_cpu_threads, resolve_device, runtime_options

MIN_ITERATIONS = 3


def _ms(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1000
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "n": len(values),
    }


def measure(model_dir: Path, images: list[bytes], bucket_s: float, single_s: float) -> dict[str, Any]:
    """Ceiling (images/s per bucket, best) and single-image latency for the artifact at ``model_dir``."""
    settings = Settings()
    configure_cpu_threads(settings)
    artifact = load_artifact(model_dir)
    batching = settings.batching_for(artifact.config.serving)
    options = runtime_options(settings, batching["max_batch_size"], resolve_device(settings.device))
    runner = ModelRunner(artifact, options, "ceiling")
    spec, max_pixels = artifact.config.input, settings.max_image_pixels

    def decode(i: int) -> np.ndarray:
        return decode_image(images[i % len(images)], spec, max_pixels)

    def bucket(size: int) -> dict[str, Any]:
        decode_s = forward_s = 0.0
        done = calls = 0
        started = time.perf_counter()
        while calls < MIN_ITERATIONS or time.perf_counter() - started < bucket_s:
            t0 = time.perf_counter()
            arrays = [decode(done + j) for j in range(size)]
            t1 = time.perf_counter()
            runner.predict(arrays)
            t2 = time.perf_counter()
            decode_s, forward_s, done, calls = decode_s + t1 - t0, forward_s + t2 - t1, done + size, calls + 1
        return {
            "batch": size,
            "calls": calls,
            "images": done,
            "images_per_s": done / (decode_s + forward_s),
            "decode_ms_per_image": 1000 * decode_s / done,
            "forward_ms_per_batch": 1000 * forward_s / calls,
            "forward_images_per_s": done / forward_s,
        }

    def single() -> dict[str, Any]:
        latencies: list[float] = []
        started = time.perf_counter()
        while len(latencies) < 10 * MIN_ITERATIONS or time.perf_counter() - started < single_s:
            t0 = time.perf_counter()
            runner.predict([decode(len(latencies))])
            latencies.append(time.perf_counter() - t0)
        return _ms(latencies)

    def decode_ceiling() -> dict[str, Any]:
        threads = settings.decode_workers
        per_thread = max(MIN_ITERATIONS, len(images))
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode, range(threads)))
            done, started = 0, time.perf_counter()
            while done < threads * per_thread or time.perf_counter() - started < single_s:
                list(pool.map(decode, range(done, done + threads * per_thread)))
                done += threads * per_thread
            elapsed = time.perf_counter() - started
        return {"threads": threads, "images": done, "images_per_s": done / elapsed}

    # Every call runs on the runner's own thread, as in the service (compiled graphs belong to it).
    warmup_s = runner.executor.submit(runner.warmup).result()
    buckets = [runner.executor.submit(bucket, b).result() for b in runner.buckets]
    single_latency = runner.executor.submit(single).result()
    runner.close()
    decoding = decode_ceiling()
    best = max(buckets, key=lambda b: b["images_per_s"])
    return {
        "what": "decode_image + ModelRunner.predict, sequential on the inference thread, no HTTP",
        "device": str(runner.device),
        "precision": str(options.dtype).removeprefix("torch."),
        "compiled": runner.compiled,
        "compile_mode": options.mode if runner.compiled else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else None,
        "max_batch_size": options.max_batch_size,
        "warmup_s": warmup_s,
        "buckets": buckets,
        "best_batch": best["batch"],
        "images_per_s": best["images_per_s"],
        "single_image": single_latency,
        "decode_ceiling": decoding,
    }


def versus_torch_compile(model_dir: Path, images: list[bytes], rounds: int, seconds: float) -> dict[str, Any]:
    """Forward time per bucket of the ahead-of-time packages against torch.compile's graphs, both in this
    process and timed in alternating blocks (A B A B ...), so that other work on the machine slows both
    alike. The packages come from the compile cache (``python -m service.precompile`` fills it)."""
    settings = Settings()
    configure_cpu_threads(settings)
    spec = load_artifact(model_dir).config
    options = runtime_options(
        settings, settings.batching_for(spec.serving)["max_batch_size"], resolve_device(settings.device)
    )
    if options.compile_cache is None:
        raise SystemExit("IGCV2_AOT is off: nothing to compare")
    runners = {
        "aot": ModelRunner(load_artifact(model_dir), options, "aot"),
        "torch.compile": ModelRunner(load_artifact(model_dir), replace(options, compile_cache=None), "compiled"),
    }
    for runner in runners.values():
        runner.executor.submit(runner.warmup).result()
    if sorted(runners["aot"].packages) != runners["aot"].buckets:
        raise SystemExit(f"the compile cache lacks packages: python -m service.precompile {model_dir} fills it")
    arrays = [decode_image(images[i % len(images)], spec.input, settings.max_image_pixels) for i in range(64)]

    def block(runner: ModelRunner, size: int) -> float:
        """Median seconds of one call of ``size`` images over ``seconds``."""
        batch, calls = (arrays * size)[:size], []
        ends = time.perf_counter() + seconds
        while len(calls) < 2 * MIN_ITERATIONS or time.perf_counter() < ends:
            started = time.perf_counter()
            runner.predict(batch)
            calls.append(time.perf_counter() - started)
        return float(np.median(calls))

    buckets = []
    for size in runners["aot"].buckets:
        blocks: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                blocks[name].append(runner.executor.submit(block, runner, size).result())
        ms = {name: 1000 * float(np.median(times)) for name, times in blocks.items()}
        buckets.append(
            {"batch": size, "ms_per_call": ms, "speed_aot_over_torch_compile": ms["torch.compile"] / ms["aot"]}
        )
    for runner in runners.values():
        runner.close()
    return {
        "what": "ModelRunner.predict of the same images, packages vs torch.compile, alternated blocks, one process",
        "device": str(options.device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "block_seconds": seconds,
        "buckets": buckets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="artifact version folder (<store>/<name>/<version>)")
    parser.add_argument("images", type=Path, nargs="+", help="encoded image files (PNG/JPEG)")
    parser.add_argument("--bucket-seconds", type=float, default=3.0, help="time per batch bucket")
    parser.add_argument("--single-seconds", type=float, default=5.0, help="time for single-image latency")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument(
        "--versus-torch-compile",
        type=int,
        metavar="ROUNDS",
        help="instead: the packages' forward against torch.compile's, ROUNDS alternated blocks of --bucket-seconds",
    )
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in args.images]
    if args.versus_torch_compile:
        result = versus_torch_compile(args.model_dir, images, args.versus_torch_compile, args.bucket_seconds)
    else:
        result = measure(args.model_dir, images, args.bucket_seconds, args.single_seconds)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
