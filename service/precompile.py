"""python -m service.precompile: fill the compile cache ahead of time, so that servers start by loading.

Run it with the server's settings, where the server runs (the same image, and the same CPU model or GPU:
packages are keyed by them, and a package for another device is simply a miss). Without arguments it
compiles what ``python -m service`` would load: the IGCV2_MODELS versions of IGCV2_MODEL_STORE, each with
its batch buckets, for IGCV2_DEVICE, IGCV2_PRECISION, IGCV2_COMPILE_MODE and IGCV2_CHANNELS_LAST, into
IGCV2_COMPILE_CACHE; the options below override them. Buckets already in the cache are checked, not
compiled again. An image build step or a Kubernetes init container runs it (docs/compile-cache.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from igcv2.artifact import load_artifact
from service.aot import AheadOfTime
from service.compile_cache import CompileCache
from service.config import Settings
from service.runtime import buckets_for, resolve_device, runtime_options, serving_module

log = logging.getLogger("igcv2.precompile")


def bucket_list(text: str) -> list[int]:
    try:
        buckets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes") from None
    if not buckets or min(buckets) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes are positive integers")
    return buckets


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.precompile", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model_dirs", type=Path, nargs="*", help="version folders (<store>/<name>/<version>); default: the configured"
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: IGCV2_DEVICE)")
    precisions = ["auto", "float32", "float16", "bfloat16"]
    parser.add_argument("--precision", choices=precisions, help="default: IGCV2_PRECISION")
    parser.add_argument("--compile-mode", help="default: IGCV2_COMPILE_MODE")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: IGCV2_CHANNELS_LAST")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--max-batch-size", type=int, help="buckets 1, 2, 4, ... up to it (default: each model's)")
    sizes.add_argument("--buckets", type=bucket_list, help="exactly these batch sizes, comma-separated")
    parser.add_argument("--cache", type=Path, help="default: IGCV2_COMPILE_CACHE")
    parser.add_argument(
        "--cpu-threads", type=int, help="intra-op threads the server runs CPU packages with (default: as it would)"
    )
    parser.add_argument("--jobs", type=int, help="buckets compiled at once, in as many processes (default: the cores)")
    parser.add_argument("--background", action="store_true", help="at the lowest CPU priority")
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # a helper of this server process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = Settings()
    role = "precompile, background" if args.background else "precompile"
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"
    )
    if args.parent:
        from service.workers import follow_parent

        follow_parent(args.parent)  # SIGTERM when the server that started it dies
    # A SIGTERM unwinds: the package being compiled goes, with its temporary folder and the compiler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # CPU kernels are generated for the process's intra-op threads: the server's count, as it will run them.
    torch.set_num_threads(args.cpu_threads or settings.inference_threads)
    if args.background:
        os.nice(19)  # its helpers and compilers inherit it: the server's own work always comes first
    cache = CompileCache(args.cache or settings.compile_cache)
    if not cache.writable:
        print(f"cannot write to the compile cache {cache.root}", file=sys.stderr)
        return 2
    device = resolve_device(args.device or settings.device)
    if args.model_dirs:
        folders = args.model_dirs
    else:
        from service.registry import ModelRegistry

        folders = [settings.model_store / n / str(v) for n, v in ModelRegistry(settings).configured_versions()]
    failed = [folder for folder in folders if not precompile(folder, args, settings, device, cache)]
    if failed:
        log.error("not precompiled: %s", ", ".join(map(str, failed)))
    return 1 if failed or not folders else 0


def precompile(
    folder: Path, args: argparse.Namespace, settings: Settings, device: torch.device, cache: CompileCache
) -> bool:
    """Compile (or check) every bucket of the artifact at ``folder``; whether that worked."""
    started = time.perf_counter()
    try:
        artifact = load_artifact(folder)
        buckets = args.buckets or buckets_for(
            args.max_batch_size or settings.batching_for(artifact.config.serving)["max_batch_size"]
        )
        options = dataclasses.replace(
            runtime_options(settings, max(buckets), device),
            precision=args.precision or settings.precision,
            compile_mode=args.compile_mode or settings.compile_mode,
            channels_last=settings.channels_last if args.channels_last is None else args.channels_last,
            compile_cache=cache.root,
            compile_jobs=args.jobs or settings.cores,
        )
        compiler = AheadOfTime(serving_module(artifact, options), artifact, options, cache)
        packages = compiler.packages(buckets, options.compile_jobs)
    except Exception:
        log.exception("%s: precompile FAILED", folder)
        return False
    origins = [p.origin for p in packages.values()]
    log.info(
        "%s: buckets %s in %s: %d compiled here, %d loaded from the cache (%.1f s)",
        compiler.label,
        ", ".join(map(str, buckets)),
        cache.root,
        origins.count("compiled"),
        origins.count("cache"),
        time.perf_counter() - started,
    )
    return True


if __name__ == "__main__":
    sys.exit(main())
