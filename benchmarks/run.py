"""python -m benchmarks.run: measure the IGCV2 service in one run and write JSON, a PNG and tables.

Modes (``--mode``, comma-separated, or ``all``):
* ``throughput`` (issue 3): the in-process ceiling; the service with batching under a closed-loop
  concurrency sweep and at fixed offered rates (open loop); the same service with
  ``IGCV2_MAX_BATCH_SIZE=1`` under the same sweep; the three target ratios.
* ``sweep``: the service with batching alone (closed loop and open loop), no ceiling and no
  second server: to compare server settings (``--server-env IGCV2_WORKERS=4``) in little time.
* ``overload`` (issue 7): a fixed offered load well above capacity (``--overload-factor`` times the
  saturation throughput, paced) for a set time, or with ``--overload-concurrency`` a closed loop of
  clients that retry at once on 503 (ignoring Retry-After): every request answered, goodput vs
  saturation, queue depth at its bound, RSS growth.
* ``soak`` (issue 7): mixed valid and invalid traffic for a set time: requests, answers by code,
  p99, RSS at start and end.

Everything is bounded (each hey process by ``-z`` and ``-t``, each wait by a timeout) and talks
to loopback only. Numbers are only meaningful on an otherwise idle machine: every phase records
the CPU the server, hey and everything else used, and the run warns when "everything else" is large.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import loadgen, report
from benchmarks.loadgen import Body, HeyRun, Stream
from benchmarks.server import ROOT, GpuUtilization, Service, StandinDevice, http
from benchmarks.workloads import Workload, latest_version_dir, model_info, prepare, soak_classes, valid_bodies

MODES = ("throughput", "sweep", "overload", "soak")
ALL_MODES = ("throughput", "overload", "soak")  # "all": sweep is a part of throughput
MIB = 1024 * 1024
QUIET_OTHER_CORES = 0.25  # CPU used by anything but the server and hey above which a phase is "not quiet"

DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion": {
        "concurrency": "1,2,4,8,16,32,64",
        "duration": 10.0,
        "warmup": 2.0,
        "images": 8,
        "bucket_seconds": 3.0,
        "single_seconds": 5.0,
    },
    "imagenet": {
        "concurrency": "1,2,4,8,16,32",
        "duration": 20.0,
        "warmup": 5.0,
        "images": 8,
        "bucket_seconds": 10.0,
        "single_seconds": 10.0,
    },
}
# Tiny everything, eager: proves the whole pipeline works (tests/benchmarks/test_bench_smoke.py).
SMOKE = {
    "concurrency": "1,4",
    "no_batching_concurrency": "4",
    "duration": 1.0,
    "warmup": 0.3,
    "images": 4,
    "bucket_seconds": 0.2,
    "single_seconds": 0.3,
    "max_batch_size": 4,
    "eager": True,
    "open_loop_rates": "0.5",
    "overload_duration": 2.0,
    "soak_duration": 2.0,
    "sample_interval": 0.25,
    "server_warmup": 0.3,
    "max_queue_size": 16,
    "soak_invalid_rate": 5.0,
}


class _Help(argparse.HelpFormatter):
    """Show a default only where there is one (None means "see the help text")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model", choices=sorted(DEFAULTS), default="fashion")
    pre.add_argument("--smoke", action="store_true")
    known, _ = pre.parse_known_args(argv)

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0], formatter_class=_Help, allow_abbrev=False
    )
    p.add_argument(
        "--model",
        choices=sorted(DEFAULTS),
        default="fashion",
        help="fashion: igcv2-fashion with Fashion-MNIST PNGs; imagenet: untrained ImageNet 1.0 preset "
        "at 224x224 with skimage photos as JPEG",
    )
    p.add_argument("--mode", default="throughput", help=f"comma-separated: {', '.join(MODES)}, or all")
    p.add_argument("--smoke", action="store_true", help="tiny, eager run that only proves everything works")
    p.add_argument(
        "--model-store",
        type=Path,
        help="store to serve from (default: model_store/ when it holds "
        "the model, else an untrained artifact under --out)",
    )
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/out/<model>)")
    p.add_argument("--concurrency", help="closed-loop sweep with batching")
    p.add_argument("--no-batching-concurrency", help="sweep with max_batch_size=1 (default: --concurrency)")
    p.add_argument("--duration", type=float, help="seconds per sweep point (after its warm-up)")
    p.add_argument("--warmup", type=float, help="seconds at the start of each point left out of its numbers")
    p.add_argument("--images", type=int, help="distinct real images to send")
    p.add_argument(
        "--photo-size",
        type=size,
        metavar="WxH",
        help="imagenet: resize the photographs to this size before JPEG encoding (e.g. 1024x768, "
        "a camera frame; default: their own sizes)",
    )
    p.add_argument("--streams", type=int, default=4, help="most hey processes per closed-loop point (one image each)")
    p.add_argument("--images-per-request", type=int, default=1, help="1: raw image body; more: multipart")
    p.add_argument(
        "--max-batch-size", type=int, help="IGCV2_MAX_BATCH_SIZE of the batching server (default: the service's own)"
    )
    p.add_argument("--max-queue-size", type=int, help="IGCV2_MAX_QUEUE_SIZE (default: the service's own)")
    p.add_argument("--eager", action="store_true", help="IGCV2_COMPILE=false (server and ceiling)")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the servers and the ceiling (repeatable)",
    )
    p.add_argument(
        "--service-root",
        type=Path,
        default=ROOT,
        help="the checkout whose python -m service runs (another design, to compare with from its own worktree)",
    )
    p.add_argument(
        "--standin-device",
        metavar="A_MS,B_MS",
        help="replace the model by a stand-in device shared by every server process whose calls take "
        "A + B * bucket ms and release the GIL (benchmarks/standin); its busy share is reported as the GPU's",
    )
    p.add_argument("--bucket-seconds", type=float, help="ceiling: seconds per batch bucket")
    p.add_argument("--single-seconds", type=float, help="ceiling: seconds of single-image latency")
    p.add_argument(
        "--open-loop-rates",
        default="0.5,0.8",
        help="open-loop offered rates as fractions of the batching saturation throughput",
    )
    p.add_argument("--rate", help="open-loop offered rates in requests/s (comma-separated; overrides the fractions)")
    p.add_argument("--open-loop-duration", type=float, help="seconds per open-loop rate (default: --duration)")
    p.add_argument("--open-loop-streams", type=int, default=8, help="staggered hey processes for pacing")
    p.add_argument(
        "--open-loop-interval",
        type=float,
        help="seconds between one paced worker's requests (default: max(0.25, 4 x p99 at concurrency 1))",
    )
    p.add_argument("--overload-duration", type=float, default=60.0, help="seconds of overload")
    p.add_argument(
        "--overload-factor",
        type=float,
        default=2.0,
        help="offered load of the overload run, as a multiple of the saturation throughput (paced)",
    )
    p.add_argument(
        "--overload-concurrency",
        type=int,
        help="instead of a paced load: this many closed-loop workers that retry at once on 503",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=512,
        help="most paced hey workers (= connections) in overload; keep well under `ulimit -n`",
    )
    p.add_argument("--soak-duration", type=float, default=300.0, help="seconds of soak")
    p.add_argument("--soak-concurrency", type=int, default=4, help="closed-loop workers sending valid images")
    p.add_argument("--soak-invalid-rate", type=float, default=5.0, help="requests/s of each kind of invalid input")
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between /metrics samples")
    p.add_argument("--server-warmup", type=float, default=3.0, help="unrecorded load after a server starts")
    p.add_argument("--request-timeout", type=int, default=60, help="hey's per-request timeout (-t), seconds")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="longest wait for a server to be ready")
    p.set_defaults(**DEFAULTS[known.model])
    if known.smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    args.modes = list(ALL_MODES) if "all" in modes else modes
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        p.error(f"--mode: unknown {sorted(unknown)}; choose from {', '.join(MODES)} or all")
    args.concurrency = ints(args.concurrency)
    args.no_batching_concurrency = ints(args.no_batching_concurrency) if args.no_batching_concurrency else None
    args.out = args.out or ROOT / "benchmarks" / "out" / args.model
    return args


def size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def ints(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    gpus = None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        gpus = [g.strip() for g in out.stdout.splitlines() if g.strip()] or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hey": loadgen.hey_version(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# (t, queue depth, RSS bytes, images computed so far, /classify answers so far, HTTP requests in progress)
Sample = tuple[float, float, float, float, float, float]


class Sampler:
    """Background /metrics sampling (queue depth, RSS) and, optionally, Retry-After probing."""

    def __init__(self, svc: Service, interval: float, probe: Body | None = None) -> None:
        self.svc, self.interval, self.probe = svc, interval, probe
        self.samples: list[Sample] = []
        self.probes: list[tuple[int, bool]] = []  # (status, has Retry-After)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.t0 = time.monotonic()

    def start(self) -> Sampler:
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._sample, daemon=True)]
        if self.probe is not None:
            self.threads.append(threading.Thread(target=self._probe, daemon=True))
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> Sampler:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=60)
        return self

    def _sample(self) -> None:
        while not self.stop_event.is_set():
            try:
                m = self.svc.scrape(timeout=max(5.0, self.interval))
                self.samples.append(
                    (
                        time.monotonic() - self.t0,
                        m.value("igcv2_queue_depth", model=self.svc.model),
                        m.value("process_resident_memory_bytes"),
                        m.value("igcv2_images_total", model=self.svc.model),
                        m.value("igcv2_requests_total", endpoint="/classify"),
                        m.value("igcv2_requests_in_progress"),
                    )
                )
            except OSError:
                pass
            self.stop_event.wait(self.interval)

    def _probe(self) -> None:
        body = self.probe
        if body is None:
            return
        data = body.path.read_bytes()
        url = f"{self.svc.url}/classify?{body.query}"
        while not self.stop_event.is_set():
            try:
                status, headers, _ = http("POST", url, data, {"Content-Type": body.content_type}, timeout=60)
                self.probes.append((status, any(k.lower() == "retry-after" for k in headers)))
            except OSError:
                self.probes.append((0, False))
            self.stop_event.wait(self.interval)


class Bench:
    """One benchmark run: owns the output folder, the workload and the result being built."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.raw = self.out / "raw"
        self.started = time.monotonic()
        self.result: dict[str, Any] = {
            "benchmark": "igcv2-serving",
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", "benchmarks.run", *argv]),
            "modes": args.modes,
            "machine": machine(),
            "warnings": [],
        }
        self.work: Workload = prepare(args.model, args.model_store, self.out, args.images, args.photo_size)
        self.version_dir = latest_version_dir(self.work.store, self.work.model)
        self.result["model"] = model_info(self.version_dir)
        if self.result["model"].get("untrained"):
            self.warn(
                f"{self.work.model} at {self.version_dir} has untrained (random) weights: "
                "speed is representative, predictions are not"
            )
        self.env = self.server_env()
        self.gpu: GpuUtilization | StandinDevice | None = None
        if args.standin_device:
            self.gpu = StandinDevice(Path(self.env["STANDIN_DEVICE_FILE"]))
        elif self.result["machine"]["gpus"]:
            self.gpu = GpuUtilization()
        self.bodies = valid_bodies(self.work, self.out / "bodies", args.images_per_request)
        self.result["settings"] = {
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "images": [p.name for p in self.work.images],
            "images_per_request": args.images_per_request,
            "streams": args.streams,
            "server_env": self.env,
            "relevant_env": relevant_env(),
        }

    def warn(self, message: str) -> None:
        self.result["warnings"].append(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def server_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.args.eager:
            env["IGCV2_COMPILE"] = "false"
        if self.args.max_batch_size:
            env["IGCV2_MAX_BATCH_SIZE"] = str(self.args.max_batch_size)
        if self.args.max_queue_size:
            env["IGCV2_MAX_QUEUE_SIZE"] = str(self.args.max_queue_size)
        if self.args.standin_device:
            device = self.raw / "standin-device"
            device.parent.mkdir(parents=True, exist_ok=True)
            device.unlink(missing_ok=True)
            env.update(
                STANDIN_DEVICE_MS=self.args.standin_device,
                STANDIN_DEVICE_FILE=str(device),
                PYTHONPATH=str(ROOT / "benchmarks" / "standin"),
                IGCV2_COMPILE="false",
            )
        for item in self.args.server_env:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--server-env wants KEY=VALUE, got {item!r}")
            env[key] = value
        return env

    # ----- phases -----

    def ceiling(self) -> dict[str, Any]:
        """The in-process ceiling, in a child process with the servers' environment."""
        self.log("in-process ceiling (compiles every bucket unless --eager)")
        target = self.raw / "ceiling.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.inprocess",
            str(self.version_dir),
            *map(str, self.work.images),
            "--bucket-seconds",
            str(self.args.bucket_seconds),
            "--single-seconds",
            str(self.args.single_seconds),
            "--out",
            str(target),
        ]
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".inductor-cache")),
            **self.env,
        }
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=self.args.ready_timeout)
        result = json.loads(target.read_text())
        self.log(
            f"ceiling {result['images_per_s']:.1f} images/s at batch {result['best_batch']}; single image "
            f"p50 {result['single_image']['p50_ms']:.2f} ms"
        )
        return result

    def start_service(self, label: str, extra: dict[str, str] | None = None) -> Service:
        self.log(f"starting the {label} server")
        env = {**self.env, **(extra or {})}
        svc = Service(self.work.store, self.work.model, env, self.raw / f"{label}.log", label, self.args.service_root)
        svc.start(self.args.ready_timeout)
        self.log(f"{label} server ready in {svc.startup_s:.1f}s")
        if self.args.server_warmup > 0:
            streams = loadgen.closed_streams(
                self.bodies, 4, self.args.server_warmup, self.args.streams, self.args.request_timeout
            )
            loadgen.run(svc.url, streams, self.raw, f"{label}-warmup")
        return svc

    def csv_phase(self, svc: Service, streams: list[Stream], tag: str, warmup: float) -> dict[str, Any]:
        """Run hey streams; the server readings frame the window after the warm-up."""
        pre = svc.reading()
        run = HeyRun(svc.url, streams, self.raw, tag)
        try:
            run.start()
            time.sleep(min(warmup, min(s.duration_s for s in streams)))
            r0 = svc.reading()
            results = run.wait()
        finally:
            run.kill()
        r1 = svc.reading()
        phase = report.csv_phase(
            results, warmup, report.server_delta(r0, r1, svc.model), report.server_delta(pre, r1, svc.model)
        )
        phase["gpu_busy"] = self.gpu.mean(r0.t, r1.t) if self.gpu else None
        if phase["unaccounted"]:
            self.warn(
                f"{tag}: {phase['unaccounted']} answers the server sent were not recorded by hey "
                "(client timeouts or transport errors)"
            )
        other = phase["cpu_cores"]["other"]
        if other is not None and other > QUIET_OTHER_CORES:
            self.warn(
                f"{tag}: other processes used {other:.2f} cores during the measurement: the machine was "
                "not quiet, so this point is not a clean number"
            )
        return phase

    def sweep(self, svc: Service, label: str, concurrencies: list[int]) -> list[dict[str, Any]]:
        points = []
        for c in concurrencies:
            streams = loadgen.closed_streams(
                self.bodies, c, self.args.warmup + self.args.duration, self.args.streams, self.args.request_timeout
            )
            point = {"concurrency": c, **self.csv_phase(svc, streams, f"{label}-c{c}", self.args.warmup)}
            lat = point["latency_ms"]
            self.log(
                f"{label} c={c}: {point['throughput_images_per_s']:.1f} images/s, p50 {lat['p50'] or 0:.2f} ms, "
                f"p99 {lat['p99'] or 0:.2f} ms, mean batch {point['mean_batch_size'] or 0:.2f}"
                + (f", GPU busy {point['gpu_busy']:.2f}" if point.get("gpu_busy") is not None else "")
            )
            points.append(point)
            time.sleep(0.5)
        return points

    def open_loop(self, svc: Service, saturation: dict[str, Any], low: dict[str, Any] | None) -> list[dict[str, Any]]:
        args = self.args
        if args.rate:
            rates = [float(r) for r in args.rate.split(",") if r.strip()]
        else:
            per_request = saturation["throughput_images_per_s"] / args.images_per_request
            rates = [f * per_request for f in (float(x) for x in args.open_loop_rates.split(",") if x.strip())]
        p99 = (low or {}).get("latency_ms", {}).get("p99") or 50.0
        min_interval = args.open_loop_interval or max(0.25, 4 * p99 / 1000)
        duration = args.open_loop_duration or args.duration
        points = []
        for rate in rates:
            if rate <= 0:
                continue
            workers, interval = loadgen.open_loop_workers(rate, min_interval)
            streams, pacing = loadgen.paced_streams(
                self.bodies, workers, interval, args.warmup + duration, args.open_loop_streams, args.request_timeout
            )
            # hey's paced workers fire first one interval after they start: leave that out too.
            point = {
                "offered_requests_per_s": rate,
                "pacing": pacing.as_dict(),
                **self.csv_phase(svc, streams, f"open-{rate:.0f}", interval + args.warmup),
            }
            if point["requests_per_s"] < 0.95 * rate:
                self.warn(
                    f"open loop at {rate:.1f} req/s achieved only {point['requests_per_s']:.1f} req/s: workers "
                    "were blocked by slow answers (raise --open-loop-interval) or the server fell behind"
                )
            lat = point["latency_ms"]
            self.log(
                f"open loop {rate:.1f} req/s: achieved {point['requests_per_s']:.1f} req/s, "
                f"p50 {lat['p50'] or 0:.2f} ms, p99 {lat['p99'] or 0:.2f} ms"
            )
            points.append(point)
            time.sleep(0.5)
        return points

    def saturation_probe(self, svc: Service) -> dict[str, Any]:
        """Closed loop at twice the largest batch: saturation throughput when no sweep ran in this run."""
        max_batch = int(svc.describe().get("batching", {}).get("max_batch_size", 32))
        c = max(8, 2 * max_batch // self.args.images_per_request)
        streams = loadgen.closed_streams(
            self.bodies, c, self.args.warmup + self.args.duration, self.args.streams, self.args.request_timeout
        )
        point = {"concurrency": c, **self.csv_phase(svc, streams, f"saturation-c{c}", self.args.warmup)}
        self.log(f"saturation probe c={c}: {point['throughput_images_per_s']:.1f} images/s")
        return point

    def overload(self, svc: Service, saturation: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        info = svc.describe()
        capacity = float(
            info.get("batching", {}).get("max_queue_size")
            or svc.scrape().value("igcv2_queue_capacity", model=svc.model)
        )
        max_batch = int(info.get("batching", {}).get("max_batch_size", 1))
        sat = saturation["throughput_images_per_s"]
        pacing = None
        if args.overload_concurrency:
            kind, workers = "closed loop, immediate retry on 503", args.overload_concurrency
            streams = loadgen.closed_streams(
                self.bodies, workers, args.overload_duration, args.streams, args.request_timeout, csv=False
            )
        else:
            # Little's law: about `capacity` requests sit in the full queue at any time, and their
            # workers skip ticks; the workers beyond those offer the rate. Connections are capped.
            kind = f"paced, {args.overload_factor:g} x saturation"
            rate = args.overload_factor * max(sat, 0.1) / args.images_per_request
            queued = math.ceil(capacity / args.images_per_request)
            interval = min(1.0, max(0.05, (args.max_workers - queued) / rate))
            workers = min(args.max_workers, math.ceil(rate * interval) + queued)
            streams, p = loadgen.paced_streams(
                self.bodies,
                workers,
                interval,
                args.overload_duration,
                args.open_loop_streams,
                args.request_timeout,
                csv=False,
            )
            pacing = {**p.as_dict(), "target_rate": rate}
        self.log(
            f"overload ({kind}): {workers} workers for {args.overload_duration:.0f}s "
            f"(queue capacity {capacity:.0f}, saturation {sat:.1f} images/s)"
        )
        r0 = svc.reading()
        sampler = Sampler(svc, args.sample_interval, probe=self.bodies[0]).start()
        try:
            results = loadgen.run(svc.url, streams, self.raw, "overload")
            r_end = svc.reading()
        finally:
            sampler.stop()
        r1 = svc.reading()
        phase = report.summary_phase(results)
        ok = sum(r.codes.get(200, 0) * r.stream.body.images / r.total_s for r in results if r.total_s)
        offered = sum(r.answered / r.total_s for r in results if r.total_s)
        seconds = max(r.total_s for r in results)
        depth = queue_stats(sampler.samples, capacity)
        rss = rss_stats(
            r0.metrics.value("process_resident_memory_bytes"),
            r_end.metrics.value("process_resident_memory_bytes"),
            sampler.samples,
        )
        probes = [s for s, _ in sampler.probes]
        shed_probes = [(s, h) for s, h in sampler.probes if s in (429, 503)]
        unexpected = {c: n for c, n in phase["codes"].items() if int(c) not in (200, *report.SHED_CODES)}
        steady = steady_rate(sampler.samples)
        goodput = steady if steady is not None else ok
        recovered = recovery_check(svc, self.bodies[0])
        # Saturation again after the overload: the machine's speed drifts by 10-20% over minutes (run P),
        # so the goodput is compared with the mean of the probes on both sides of it.
        after = self.saturation_probe(svc)["throughput_images_per_s"]
        bracket = (sat + after) / 2
        goodput_ratio = goodput / bracket if bracket else None
        out = {
            "kind": kind,
            "seconds": seconds,
            "workers": workers,
            "pacing": pacing,
            "images_per_request": args.images_per_request,
            "offered_requests_per_s": offered,
            "offered_vs_saturation": offered * args.images_per_request / sat if sat else None,
            "offered_requests_per_s_steady": steady_rate(sampler.samples, 4),
            # Steady state (middle 80% of the run, server's images counter), as saturation is measured
            # after a warm-up; the client's count of 200s over the whole run, start and drain included, too.
            "goodput_images_per_s": goodput,
            "goodput_images_per_s_whole_run": ok,
            "saturation_images_per_s": bracket,
            "saturation_before_after_images_per_s": [sat, after],
            "saturation_concurrency": saturation["concurrency"],
            **phase,
            "unexpected_codes": unexpected,
            "server": report.server_delta(r0, r_end, svc.model),
            "queue_depth": depth,
            "requests_in_progress": in_progress_stats(sampler.samples),
            "rss": rss,
            "retry_after": {
                "probes": len(probes),
                "shed": len(shed_probes),
                "codes": report.merge_codes({s: probes.count(s) for s in set(probes)}),
                "all_present": all(h for _, h in shed_probes),
            },
            "alive_after": svc.alive(),
            "recovered_after": recovered,
            "rss_after_idle_mib": r1.metrics.value("process_resident_memory_bytes") / MIB,
        }
        out["targets"] = {
            "every_request_answered": {"met": not phase["transport_errors"] and not unexpected and svc.alive()},
            "goodput_vs_saturation": report.ratio(goodput_ratio, 0.9, True),
            "queue_bounded": {"met": depth["max"] is not None and depth["max"] <= capacity},
            "queue_held_at_bound": {
                "met": depth["median"] is not None and depth["median"] >= capacity - max_batch,
                "rule": "median depth >= capacity - max_batch_size",
            },
            "rss_growth": report.ratio(rss["growth"], 0.10, False),
            "retry_after_on_shed": {"met": all(h for _, h in shed_probes) if shed_probes else None},
        }
        self.log(
            f"overload: goodput {goodput:.1f} images/s = {goodput_ratio or 0:.3f} x saturation {bracket:.1f} "
            f"(probes {sat:.1f} before, {after:.1f} after); codes "
            f"{phase['codes']}; transport errors {sum(phase['transport_errors'].values())}; queue median "
            f"{depth['median']} of {capacity:.0f}; RSS growth {100 * (rss['growth'] or 0):.1f}%"
        )
        return out

    def soak(self, svc: Service) -> dict[str, Any]:
        args = self.args
        max_images = int(self.env.get("IGCV2_MAX_IMAGES_PER_REQUEST", default_setting("max_images_per_request")))
        classes = soak_classes(self.work, self.out / "bodies", max_images)
        streams = []
        for cls in classes:
            if cls.expected == (200,):
                workers = max(1, args.soak_concurrency // (1 if cls.body.images == 1 else 2))
                streams.append(Stream(cls.body, workers, args.soak_duration, None, False, args.request_timeout))
            else:
                streams.append(
                    Stream(cls.body, 1, args.soak_duration, args.soak_invalid_rate, False, args.request_timeout)
                )
        self.log(f"soak: {len(streams)} kinds of traffic for {args.soak_duration:.0f}s")
        r0 = svc.reading()
        sampler = Sampler(svc, args.sample_interval).start()
        try:
            results = loadgen.run(svc.url, streams, self.raw, "soak")
            r_end = svc.reading()
        finally:
            sampler.stop()
        phase = report.summary_phase(results)
        expected = {cls.body.name: cls.expected for cls in classes}
        kinds, unexpected = {}, 0
        for cls, r, s in zip(classes, results, phase["streams"], strict=True):
            wrong = {str(c): n for c, n in r.codes.items() if c not in cls.expected and c not in report.SHED_CODES}
            unexpected += sum(wrong.values())
            kinds[cls.body.name] = {**s, "expected": list(expected[cls.body.name]), "unexpected": wrong}
        valid_p99 = [k["latency_ms"].get("p99") for k in kinds.values() if k["expected"] == [200]]
        rss = rss_stats(
            r0.metrics.value("process_resident_memory_bytes"),
            r_end.metrics.value("process_resident_memory_bytes"),
            sampler.samples,
        )
        seconds = max(r.total_s for r in results)
        out = {
            "seconds": seconds,
            "requests": phase["requests_answered"] + sum(phase["transport_errors"].values()),
            "codes": phase["codes"],
            "transport_errors": phase["transport_errors"],
            "unexpected": unexpected,
            "server_errors": {c: n for c, n in phase["codes"].items() if int(c) >= 500 and int(c) not in (503, 504)},
            "valid_p99_ms": max((v for v in valid_p99 if v is not None), default=None),
            "kinds": kinds,
            "server": report.server_delta(r0, r_end, svc.model),
            "rss": rss,
            "loadgen_cores": phase["loadgen_cores"],
            "alive_after": svc.alive(),
            "recovered_after": recovery_check(svc, self.bodies[0]),
        }
        p99 = "-" if out["valid_p99_ms"] is None else f"{out['valid_p99_ms']:.1f}"  # hey gives p99 from 100 answers
        self.log(
            f"soak: {out['requests']} requests, codes {out['codes']}, unexpected {unexpected}, "
            f"valid p99 {p99} ms, RSS growth {100 * (rss['growth'] or 0):.1f}%"
        )
        return out

    # ----- the run -----

    def run(self) -> dict[str, Any]:
        args, result = self.args, self.result
        modes = set(args.modes)
        if "throughput" in modes:
            result["ceiling"] = self.ceiling()
        with self.start_service("batching") as svc:
            result["batching"] = {"server": svc.describe(), "startup_s": svc.startup_s}
            saturation: dict[str, Any] | None = None
            if modes & {"throughput", "sweep"}:
                sweep = self.sweep(svc, "batching", args.concurrency)
                result["batching"]["sweep"] = sweep
                saturation = max(sweep, key=lambda p: p["throughput_images_per_s"])
                result["open_loop"] = self.open_loop(svc, saturation, min(sweep, key=lambda p: p["concurrency"]))
            if "overload" in modes:
                saturation = saturation or self.saturation_probe(svc)
                result["overload"] = self.overload(svc, saturation)
            if "soak" in modes:
                result["soak"] = self.soak(svc)
        if "throughput" in modes:
            with self.start_service("no_batching", {"IGCV2_MAX_BATCH_SIZE": "1"}) as svc:
                result["no_batching"] = {
                    "server": svc.describe(),
                    "startup_s": svc.startup_s,
                    "sweep": self.sweep(svc, "no_batching", args.no_batching_concurrency or args.concurrency),
                }
            result["ratios"] = report.ratios(
                result["ceiling"], result["batching"]["sweep"], result["no_batching"]["sweep"]
            )
            for name, r in result["ratios"].items():
                if r.get("note"):
                    self.warn(f"{name}: {r['note']}")
        result["seconds"] = time.monotonic() - self.started
        return result

    def write(self) -> dict[str, Path]:
        paths = {"json": self.out / "results.json", "markdown": self.out / "results.md"}
        paths["json"].write_text(json.dumps(self.result, indent=2, default=jsonable) + "\n")
        png = report.plot(self.result, self.out / "latency_throughput.png")
        if png:
            paths["png"] = png
        paths["markdown"].write_text(report.markdown(self.result))
        return paths


def relevant_env() -> dict[str, str]:
    """Environment that changes the numbers (threads, allocator, compile caches)."""
    prefixes = ("IGCV2_", "OMP_", "MKL_", "TORCH", "KMP_", "GOMP_", "MALLOC_", "CUDA_VISIBLE")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)}


def default_setting(name: str) -> Any:
    from service.config import Settings

    return Settings.model_fields[name].default


def middle(samples: list[Sample]) -> list[Sample]:
    """Samples of the middle 80% of a run: the start fills the queue, the end drains it."""
    if not samples:
        return []
    end = samples[-1][0]
    return [s for s in samples if 0.1 * end <= s[0] <= 0.9 * end] or samples


def queue_stats(samples: list[Sample], capacity: float) -> dict[str, Any]:
    """Queue depth in the middle of the run (and its maximum over all of it)."""
    if not samples:
        return {"capacity": capacity, "samples": 0, "median": None, "p10": None, "max": None, "mean": None}
    depths = [s[1] for s in middle(samples)]
    return {
        "capacity": capacity,
        "samples": len(samples),
        "median": float(np.median(depths)),
        "p10": float(np.percentile(depths, 10)),
        "mean": float(np.mean(depths)),
        "max": float(max(s[1] for s in samples)),
        "series": [[round(s[0], 2), s[1]] for s in samples],
    }


def in_progress_stats(samples: list[Sample]) -> dict[str, float | None]:
    """HTTP requests in progress, middle of the run (and the maximum): many beside a short queue means
    they wait for the event loop, not the model."""
    if not samples:
        return {"median": None, "max": None}
    return {"median": float(np.median([s[5] for s in middle(samples)])), "max": float(max(s[5] for s in samples))}


def steady_rate(samples: list[Sample], column: int = 3) -> float | None:
    """A server counter's rate over the middle of the run (3: images computed, 4: /classify answers)."""
    inner = middle(samples)
    if len(inner) < 2 or inner[-1][0] <= inner[0][0]:
        return None
    return (inner[-1][column] - inner[0][column]) / (inner[-1][0] - inner[0][0])


def rss_stats(start: float, end: float, samples: list[Sample]) -> dict[str, Any]:
    peak = max([start, end, *(s[2] for s in samples)])
    return {
        "start_mib": start / MIB,
        "end_mib": end / MIB,
        "max_mib": peak / MIB,
        "growth": (end - start) / start if start else None,
        "series_mib": [[round(s[0], 2), round(s[2] / MIB, 1)] for s in samples],
    }


def recovery_check(svc: Service, body: Body, timeout: float = 30.0) -> bool:
    """After the load: the server still answers a good request with 200 (within ``timeout``)."""
    deadline = time.monotonic() + timeout
    data = body.path.read_bytes()
    while time.monotonic() < deadline:
        try:
            status, _, _ = http("POST", f"{svc.url}/classify?{body.query}", data, {"Content-Type": body.content_type})
            if status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers and hey processes this run started are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    bench = Bench(args, argv)
    try:
        bench.run()
    except BaseException as exc:
        bench.result["error"] = f"{type(exc).__name__}: {exc}"
        bench.result["seconds"] = time.monotonic() - bench.started
        try:
            bench.write()  # keep what was measured before the failure
        except Exception as write_exc:  # the original error matters more
            print(f"could not write partial results: {write_exc}", file=sys.stderr)
        raise
    finally:
        if bench.gpu:
            bench.gpu.close()
    paths = bench.write()
    print(report.markdown(bench.result))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
