"""gRPC against HTTP /v2 on the same server: ModelInfer with a raw UINT8 tensor of one image, closed loop.

``python -m benchmarks.wires`` starts ``python -m service`` for each model (Fashion-MNIST 28x28x1, the
ImageNet preset's 224x224x3) and, at each concurrency, alternates the two wires (HTTP, gRPC, HTTP, gRPC,
...), so that both see the same machine. Throughput (answers/s) and the p50/p99 latency of the successful
answers are reported per phase, and gRPC's as ratios of the HTTP phases beside them.

Both clients run here, on asyncio, as lean as each wire allows, so that they cost about the same: every
request is encoded once before the run (gRPC: the serialized ModelInferRequest, sent with grpc.aio and
identity serializers; HTTP: the whole request with the binary tensor extension, written on kept-alive
connections, the answers read by Content-Length). A Python load generator takes CPU from the server on a
small machine: the client's CPU seconds are reported for each phase, as are the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.http as triton_http
from PIL import Image
from tritonclient.grpc import service_pb2

from benchmarks.server import Service, process_cpu_s
from benchmarks.workloads import (
    BUNDLED_STORE,
    fashion_pngs,
    photo_jpegs,
    untrained_fashion,
    untrained_imagenet,
    versions,
)

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Phase:
    wire: str
    concurrency: int
    seconds: float
    answers: int
    errors: int
    throughput: float  # answers/s
    p50_ms: float
    p99_ms: float
    client_cpu_s: float
    server_cpu_s: float


def images(model: str, n: int = 8) -> np.ndarray:
    """``n`` real images as the model's uint8 NHWC input: Fashion-MNIST test images, or photographs at 224x224."""
    if model == "fashion":
        files, size, mode = fashion_pngs(n), (28, 28), "L"
    else:
        files, size, mode = photo_jpegs(n), (224, 224), "RGB"
    arrays = [np.asarray(Image.open(io.BytesIO(data)).convert(mode).resize(size)) for _, data in files]
    return np.stack(arrays).reshape(len(arrays), size[1], size[0], -1)


def grpc_requests(name: str, batch: np.ndarray) -> list[bytes]:
    out = []
    for image in batch:
        request = service_pb2.ModelInferRequest(model_name=name)
        request.inputs.add(name="image", datatype="UINT8", shape=[1, *image.shape])
        request.raw_input_contents.append(image.tobytes())
        out.append(request.SerializeToString())
    return out


def http_requests(name: str, batch: np.ndarray, host: str) -> list[bytes]:
    out = []
    for image in batch:
        tensor = triton_http.InferInput("image", [1, *image.shape], "UINT8")
        tensor.set_data_from_numpy(image[None], binary_data=True)
        outputs = [triton_http.InferRequestedOutput("probabilities", binary_data=True)]
        body, header_length = triton_http.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
        head = (
            f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {header_length}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def http_worker(
    host: str, port: int, bodies: list[bytes], until: float, record: list[tuple[float, bool]]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        i = 0
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(bodies[i % len(bodies)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
            await reader.readexactly(length)
            record.append((time.perf_counter() - started, head.startswith(b"HTTP/1.1 200")))
            i += 1
    finally:
        writer.close()


async def grpc_worker(call: Any, bodies: list[bytes], until: float, record: list[tuple[float, bool]]) -> None:
    i = 0
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            await call(bodies[i % len(bodies)], timeout=120)
            ok = True
        except grpc.aio.AioRpcError:
            ok = False
        record.append((time.perf_counter() - started, ok))
        i += 1


async def phase(svc: Service, wire: str, c: int, bodies: list[bytes], warmup: float, duration: float) -> Phase:
    """``c`` closed-loop clients for warmup + duration seconds; the warm-up's answers are left out."""
    host, port = "127.0.0.1", svc.port
    record: list[tuple[float, bool]] = []
    async with grpc.aio.insecure_channel(svc.grpc_target) as channel:
        call = channel.unary_unary(MODEL_INFER)  # bytes in, bytes out: no protobuf work in the client
        start = time.perf_counter()
        until = start + warmup + duration
        if wire == "grpc":
            workers = [grpc_worker(call, bodies, until, record) for _ in range(c)]
        else:
            workers = [http_worker(host, port, bodies, until, record) for _ in range(c)]
        tasks = [asyncio.ensure_future(w) for w in workers]
        await asyncio.sleep(warmup)
        record.clear()
        client0, server0, t0 = time.process_time(), process_cpu_s(svc.pid), time.perf_counter()
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - t0
        client_cpu, server_cpu = time.process_time() - client0, process_cpu_s(svc.pid) - server0
    good = np.array([latency for latency, ok in record if ok]) * 1000
    return Phase(
        wire,
        c,
        round(seconds, 2),
        len(good),
        sum(1 for _, ok in record if not ok),
        round(len(good) / seconds, 1),
        round(float(np.percentile(good, 50)), 2) if len(good) else float("nan"),
        round(float(np.percentile(good, 99)), 2) if len(good) else float("nan"),
        round(client_cpu, 1),
        round(server_cpu, 1),
    )


def ratios(phases: list[Phase]) -> dict[str, float]:
    """gRPC over HTTP, each gRPC phase against the mean of the HTTP phases beside it (A B A B)."""
    http = [p for p in phases if p.wire == "http"]
    grpc_ = [p for p in phases if p.wire == "grpc"]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    return {
        "throughput": round(mean([p.throughput for p in grpc_]) / mean([p.throughput for p in http]), 3),
        "p50": round(mean([p.p50_ms for p in grpc_]) / mean([p.p50_ms for p in http]), 3),
        "p99": round(mean([p.p99_ms for p in grpc_]) / mean([p.p99_ms for p in http]), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wires", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion,imagenet", help="fashion, imagenet or both")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--rounds", type=int, default=2, help="HTTP, gRPC pairs at each concurrency")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase after its warm-up")
    parser.add_argument("--eager", default="imagenet", help="models served without torch.compile (comma-separated)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/wires"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": "python -m benchmarks.wires " + " ".join(argv or []), "models": {}}
    for model in args.models.split(","):
        if model == "fashion":
            store = (
                BUNDLED_STORE if versions(BUNDLED_STORE / "igcv2-fashion") else untrained_fashion(args.out / "store")
            )
            name = "igcv2-fashion"
        else:
            store, name = untrained_imagenet(args.out / "store"), "igcv2-imagenet-untrained"
        env = {"IGCV2_COMPILE": "false"} if model in args.eager.split(",") else {}
        batch = images(model)
        with Service(store, name, env, args.out / f"{model}-server.log", model).start(timeout=1800) as svc:
            bodies = {"grpc": grpc_requests(name, batch), "http": http_requests(name, batch, f"127.0.0.1:{svc.port}")}
            phases: list[Phase] = []
            for c in map(int, args.concurrency.split(",")):
                for _ in range(args.rounds):
                    for wire in ("http", "grpc"):
                        done = asyncio.run(phase(svc, wire, c, bodies[wire], args.warmup, args.duration))
                        print(json.dumps(asdict(done)), flush=True)
                        phases.append(done)
            by_c = {c: ratios([p for p in phases if p.concurrency == c]) for c in map(int, args.concurrency.split(","))}
        results["models"][model] = {
            "model": name,
            "input": list(batch.shape[1:]),
            "compiled": not env,
            "phases": [asdict(p) for p in phases],
            "grpc_over_http": by_c,
        }
        print(model, json.dumps(by_c), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
