"""Turning raw hey rows and /metrics deltas into the numbers the issue asks for, a plot and tables.

Kept apart from the orchestration so the arithmetic (windows, percentiles, ratios) can be read
and tested on its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen import StreamResult
from benchmarks.server import Reading

SHED_CODES = (429, 503, 504)  # documented answers under overload (with Retry-After for 429/503)


def latency_ms(seconds: np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99/mean/max in milliseconds (None when there is nothing to summarise)."""
    if seconds.size == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    ms = seconds * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


def merge_codes(*maps: dict[Any, int] | dict[Any, float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in maps:
        for code, n in m.items():
            out[str(code)] = out.get(str(code), 0) + round(n)
    return dict(sorted(out.items()))


def server_delta(r0: Reading, r1: Reading, model: str) -> dict[str, Any]:
    """What the server did between two readings: batches, images, CPU, answers by code."""
    labels = {"model": model}
    dt = r1.t - r0.t

    def delta(name: str) -> float:
        return r1.metrics.value(name, **labels) - r0.metrics.value(name, **labels)

    d_count, d_sum = delta("igcv2_batch_size_count"), delta("igcv2_batch_size_sum")
    codes1 = r1.metrics.by_label("igcv2_requests_total", "code", endpoint="/classify")
    codes0 = r0.metrics.by_label("igcv2_requests_total", "code", endpoint="/classify")
    rejected1 = r1.metrics.by_label("igcv2_rejected_images_total", "reason", **labels)
    rejected0 = r0.metrics.by_label("igcv2_rejected_images_total", "reason", **labels)
    return {
        "seconds": dt,
        "batches": round(d_count),
        "images_computed": round(d_sum),
        "mean_batch_size": d_sum / d_count if d_count else None,
        "images_per_s": d_sum / dt if dt > 0 else None,
        "answers_by_code": {
            c: round(n - codes0.get(c, 0.0)) for c, n in sorted(codes1.items()) if round(n - codes0.get(c, 0.0))
        },
        "rejected_images": {r: round(n - rejected0.get(r, 0.0)) for r, n in sorted(rejected1.items())},
        "cpu_cores": (r1.server_cpu_s - r0.server_cpu_s) / dt if dt > 0 else None,
        # Share of wall time the inference thread spent in predict (copy in, forward, copy out).
        "inference_busy": delta("igcv2_inference_duration_seconds_sum") / dt if dt > 0 else None,
        "machine_busy_cores": (r1.machine_busy_s - r0.machine_busy_s) / dt if dt > 0 else None,
    }


def loadgen_cores(results: list[StreamResult]) -> float:
    """CPU the hey processes used, in cores (their CPU seconds over the run's wall time)."""
    wall = max((r.wall_s for r in results), default=0.0)
    return sum(r.cpu_s for r in results) / wall if wall > 0 else 0.0


def csv_phase(
    results: list[StreamResult],
    warmup_s: float,
    server: dict[str, Any],
    pre_to_end: dict[str, Any],
) -> dict[str, Any]:
    """A closed- or open-loop phase from hey's CSV rows; the first ``warmup_s`` of each stream is left out.

    Throughput per stream = successful images started after the warm-up / (last answer - warm-up);
    streams run side by side, so their rates add.
    """
    ok_images = requests = 0.0
    latencies, measured = [], 0
    for r in results:
        keep = r.offset_s >= warmup_s
        window = r.total_s - warmup_s
        ok = keep & (r.status == 200)
        if window > 0:
            ok_images += ok.sum() * r.stream.body.images / window
            requests += keep.sum() / window
        latencies.append(r.latency_s[ok])
        measured += int(keep.sum())
    answered = sum(r.answered for r in results)
    server_answered = sum(pre_to_end["answers_by_code"].values())
    gen = loadgen_cores(results)
    machine = server.get("machine_busy_cores")
    cores = server.get("cpu_cores")
    return {
        "throughput_images_per_s": ok_images,
        "requests_per_s": requests,
        "latency_ms": latency_ms(np.concatenate(latencies) if latencies else np.zeros(0)),
        "codes": merge_codes(*(r.codes for r in results)),
        "requests_measured": measured,
        "requests_answered": answered,
        # hey's CSV leaves transport errors out: answers the server sent that hey did not record.
        "unaccounted": server_answered - answered,
        "mean_batch_size": server["mean_batch_size"],
        "inference_busy": server.get("inference_busy"),
        "server": server,
        "cpu_cores": {
            "server": cores,
            "loadgen": gen,
            "machine": machine,
            "other": None if machine is None or cores is None else max(0.0, machine - cores - gen),
        },
    }


def summary_phase(results: list[StreamResult]) -> dict[str, Any]:
    """A phase from hey's summaries: every status code and every transport error, per stream and in all."""
    streams = []
    for r in results:
        streams.append(
            {
                "body": r.stream.body.name,
                "workers": r.stream.workers,
                "rate_per_worker": r.stream.rate,
                "seconds": r.total_s,
                "codes": merge_codes(r.codes),
                "transport_errors": r.errors,
                "latency_ms": {f"p{p}": v * 1000 for p, v in sorted(r.percentiles_s.items())},
                "requests_per_s": r.answered / r.total_s if r.total_s else None,
            }
        )
    errors: dict[str, int] = {}
    for r in results:
        for msg, n in r.errors.items():
            errors[msg] = errors.get(msg, 0) + n
    return {
        "codes": merge_codes(*(r.codes for r in results)),
        "transport_errors": errors,
        "requests_answered": sum(r.answered for r in results),
        "streams": streams,
        "loadgen_cores": loadgen_cores(results),
    }


def ratio(value: float | None, target: float, higher_is_better: bool, **context: Any) -> dict[str, Any]:
    met = None if value is None or math.isnan(value) else (value >= target if higher_is_better else value <= target)
    return {"value": value, "target": f"{'>=' if higher_is_better else '<='} {target}", "met": met, **context}


def ratios(
    ceiling: dict[str, Any] | None,
    batching: list[dict[str, Any]],
    no_batching: list[dict[str, Any]],
    target_concurrency: int = 32,
) -> dict[str, Any]:
    """The three ratios of issue 3, from this run's numbers (and which points they came from)."""
    out: dict[str, Any] = {}
    by_b = {p["concurrency"]: p for p in batching}
    by_n = {p["concurrency"]: p for p in no_batching}
    common = sorted(set(by_b) & set(by_n))
    if common:
        c = target_concurrency if target_concurrency in common else common[-1]
        b, n = by_b[c]["throughput_images_per_s"], by_n[c]["throughput_images_per_s"]
        out["batching_speedup"] = ratio(
            b / n if n else None,
            2.5,
            True,
            concurrency=c,
            batching_images_per_s=b,
            no_batching_images_per_s=n,
            note=None if c == target_concurrency else f"concurrency {target_concurrency} not in both sweeps; used {c}",
        )
    if batching and ceiling:
        best = max(batching, key=lambda p: p["throughput_images_per_s"])
        out["saturation_vs_ceiling"] = ratio(
            best["throughput_images_per_s"] / ceiling["images_per_s"],
            0.5,
            True,
            saturation_images_per_s=best["throughput_images_per_s"],
            saturation_concurrency=best["concurrency"],
            ceiling_images_per_s=ceiling["images_per_s"],
            ceiling_batch=ceiling["best_batch"],
        )
        low = min(batching, key=lambda p: p["concurrency"])
        p50, single = low["latency_ms"]["p50"], ceiling["single_image"]["p50_ms"]
        out["c1_latency_vs_inprocess"] = ratio(
            p50 / single if p50 is not None and single else None,
            2.0,
            False,
            concurrency=low["concurrency"],
            service_p50_ms=p50,
            inprocess_single_p50_ms=single,
            note=None if low["concurrency"] == 1 else "concurrency 1 not in the sweep",
        )
    return out


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Latency (p50 solid, p99 dashed) against throughput for every measured point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    drawn = False
    series = [
        ("batching", "closed loop, batching", "tab:blue"),
        ("no_batching", "closed loop, max_batch_size=1", "tab:red"),
    ]
    for key, label, colour in series:
        points = (result.get(key) or {}).get("sweep") or []
        points = [p for p in points if p["latency_ms"]["p50"] is not None]
        if not points:
            continue
        x = [p["throughput_images_per_s"] for p in points]
        ax.plot(x, [p["latency_ms"]["p50"] for p in points], "o-", color=colour, label=f"{label}: p50")
        ax.plot(x, [p["latency_ms"]["p99"] for p in points], "s--", color=colour, alpha=0.6, label=f"{label}: p99")
        for p, xi in zip(points, x, strict=True):
            ax.annotate(
                f"c={p['concurrency']}",
                (xi, p["latency_ms"]["p50"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=colour,
            )
        drawn = True
    open_points = [p for p in (result.get("open_loop") or []) if p["latency_ms"]["p50"] is not None]
    if open_points:
        x = [p["throughput_images_per_s"] for p in open_points]
        ax.plot(
            x,
            [p["latency_ms"]["p50"] for p in open_points],
            "D",
            color="tab:green",
            label="open loop (fixed rate): p50",
        )
        ax.plot(
            x,
            [p["latency_ms"]["p99"] for p in open_points],
            "v",
            color="tab:green",
            alpha=0.6,
            label="open loop (fixed rate): p99",
        )
        drawn = True
    ceiling = result.get("ceiling")
    if ceiling:
        ax.axvline(
            ceiling["images_per_s"],
            color="grey",
            linestyle=":",
            label=f"in-process ceiling ({ceiling['images_per_s']:.0f} img/s, batch {ceiling['best_batch']})",
        )
        ax.axhline(
            ceiling["single_image"]["p50_ms"],
            color="black",
            linestyle=":",
            label=f"in-process single image p50 ({ceiling['single_image']['p50_ms']:.2f} ms)",
        )
    if not drawn:
        plt.close(fig)
        return None
    model = result["model"]
    ax.set_yscale("log")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(
        f"{model['name']} v{model['version']}{' (untrained)' if model.get('untrained') else ''}: "
        f"latency vs throughput, {result['machine']['cores']} cores"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    """Tables for benchmarks/RESULTS.md (the numbers are the JSON's; this only lays them out)."""
    m, machine = result["model"], result["machine"]
    lines = [
        f"# {m['name']} v{m['version']}{' (UNTRAINED weights)' if m.get('untrained') else ''}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"python {machine['python']}, hey {machine['hey']}",
        f"- started {result['started']}, took {_f(result.get('seconds'), 0)} s",
        "",
    ]
    for w in result.get("warnings", []):
        lines.append(f"> warning: {w}")
    if result.get("warnings"):
        lines.append("")
    c = result.get("ceiling")
    if c:
        lines += [
            "## In-process ceiling",
            "",
            f"{c['device']}, {c['precision']}, compiled={c['compiled']} ({c['compile_mode']}), "
            f"torch {c['torch']} with {c['torch_threads']} threads, warm-up {c['warmup_s']:.1f} s",
            "",
            "| batch | images/s | decode ms/image | forward ms/batch |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {b['batch']} | {b['images_per_s']:.1f} | {b['decode_ms_per_image']:.3f} | "
            f"{b['forward_ms_per_batch']:.2f} |"
            for b in c["buckets"]
        ]
        s = c["single_image"]
        lines += ["", f"Single image (decode + forward): p50 {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms", ""]
        if d := c.get("decode_ceiling"):
            lines += [f"Decode ceiling: {d['images_per_s']:.1f} images/s on {d['threads']} threads", ""]
    header = [
        "| concurrency | images/s | req/s | p50 ms | p95 ms | p99 ms | mean batch | server cores | "
        "hey cores | other cores | model busy | GPU busy | codes |",
        "|---" * 13 + "|",
    ]
    for key, title in (("batching", "Service, batching"), ("no_batching", "Service, max_batch_size=1")):
        sweep = (result.get(key) or {}).get("sweep")
        if not sweep:
            continue
        lines += [f"## {title} (closed loop)", "", *header]
        for p in sweep:
            lat, cpu = p["latency_ms"], p["cpu_cores"]
            lines.append(
                f"| {p['concurrency']} | {_f(p['throughput_images_per_s'])} | {_f(p['requests_per_s'])} | "
                f"{_f(lat['p50'], 2)} | {_f(lat['p95'], 2)} | {_f(lat['p99'], 2)} | "
                f"{_f(p['mean_batch_size'], 2)} | {_f(cpu['server'], 2)} | {_f(cpu['loadgen'], 2)} | "
                f"{_f(cpu['other'], 2)} | {_f(p.get('inference_busy'), 2)} | {_f(p.get('gpu_busy'), 2)} | "
                f"{p['codes']} |"
            )
        lines.append("")
    if result.get("open_loop"):
        lines += [
            "## Open loop (fixed offered rate)",
            "",
            "| offered req/s | achieved req/s | images/s | p50 ms | p95 ms | p99 ms | mean batch | codes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in result["open_loop"]:
            lat = p["latency_ms"]
            lines.append(
                f"| {_f(p['offered_requests_per_s'])} | {_f(p['requests_per_s'])} | "
                f"{_f(p['throughput_images_per_s'])} | {_f(lat['p50'], 2)} | {_f(lat['p95'], 2)} | "
                f"{_f(lat['p99'], 2)} | {_f(p['mean_batch_size'], 2)} | {p['codes']} |"
            )
        lines.append("")
    if result.get("ratios"):
        lines += ["## Ratios (issue 3 targets)", "", "| ratio | value | target | met |", "|---|---|---|---|"]
        for name, r in result["ratios"].items():
            lines.append(f"| {name} | {_f(r['value'], 2)} | {r['target']} | {r['met']} |")
        lines.append("")
    o = result.get("overload")
    if o:
        q, rss, busy = o["queue_depth"], o["rss"], o["requests_in_progress"]
        lines += [
            "## Overload (issue 7)",
            "",
            f"- {o['seconds']:.0f} s, {o['kind']}, {o['workers']} workers; offered "
            f"{_f(o['offered_requests_per_s'])} req/s ({_f(o['offered_vs_saturation'], 2)} x saturation); "
            f"answers {o['codes']}; "
            f"transport errors {sum(o['transport_errors'].values())}",
            f"- goodput {_f(o['goodput_images_per_s'])} images/s vs saturation "
            f"{_f(o['saturation_images_per_s'])} (mean of the probes before and after, "
            f"{' and '.join(_f(s) for s in o['saturation_before_after_images_per_s'])}): "
            f"{_f(o['targets']['goodput_vs_saturation']['value'], 3)} (target >= 0.9)",
            f"- queue depth (middle of run): median {_f(q['median'])}, max {_f(q['max'])} of capacity "
            f"{_f(q['capacity'], 0)}; HTTP requests in progress: median {_f(busy['median'])}, "
            f"max {_f(busy['max'])}",
            f"- RSS {rss['start_mib']:.1f} -> {rss['end_mib']:.1f} MiB (max {rss['max_mib']:.1f}): "
            f"growth {100 * (rss['growth'] or 0):.1f}% (target < 10%)",
            f"- Retry-After on every probed 503/429: {o['retry_after']['all_present']}",
            "",
        ]
    s = result.get("soak")
    if s:
        rss = s["rss"]
        lines += [
            "## Soak (issue 7)",
            "",
            f"- {s['seconds']:.0f} s, {s['requests']} requests, answers by code {s['codes']}, "
            f"transport errors {sum(s['transport_errors'].values())}, unexpected answers {s['unexpected']}",
            f"- p99 of valid requests {_f(s['valid_p99_ms'], 2)} ms",
            f"- RSS {rss['start_mib']:.1f} -> {rss['end_mib']:.1f} MiB (max {rss['max_mib']:.1f}): "
            f"growth {100 * (rss['growth'] or 0):.1f}%",
            "",
        ]
    return "\n".join(lines) + "\n"
