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
    configure_cpu_threads(settings.cpu_threads, settings.cores)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="artifact version folder (<store>/<name>/<version>)")
    parser.add_argument("images", type=Path, nargs="+", help="encoded image files (PNG/JPEG)")
    parser.add_argument("--bucket-seconds", type=float, default=3.0, help="time per batch bucket")
    parser.add_argument("--single-seconds", type=float, default=5.0, help="time for single-image latency")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    result = measure(args.model_dir, [p.read_bytes() for p in args.images], args.bucket_seconds, args.single_seconds)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
