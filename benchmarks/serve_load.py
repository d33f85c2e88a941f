"""Bounded load test of the embedding server on loopback, against in-process ``encode`` throughput.

For each concurrency level, a fixed number of requests (each ``--inputs-per-request`` texts from
the bundled multilingual NTREX corpus) is sent to ``/v1/embeddings`` by that many concurrent
clients, stopping early at ``--max-seconds``. The report gives throughput (inputs/s), latency
percentiles and how well the server batched, and divides throughput by the in-process
``Embedder.encode`` throughput on the same inputs, same device, dtype and CPU threads, measured in
the same run (the goal on GPU: >= 0.8 at high concurrency).

    python benchmarks/serve_load.py --out benchmarks/results/serve_load_cpu.json     # tiny model
    python benchmarks/serve_load.py --model runs/main/model --num-gpus 1 --concurrency 1 8 32 128 \\
        --requests 2000 --inputs-per-request 16 --out benchmarks/results/serve_load_gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from babelforge.utils import ray_env  # noqa: F401  (loopback for local Ray before ray is imported)

import httpx
import numpy as np

from babelforge.resources import NTREX_FILES, ntrex_file
from babelforge.serve import ServeConfig, load_serve_config, start_server


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: a tiny random model built on the fly)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--inputs-per-request", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time cap per concurrency level")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the replica (and baseline threads)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs of the replica (1 for a GPU run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="ServeConfig override, e.g. batching.max_batch_tokens=32768")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    return parser.parse_args()


def workload(requests: int, inputs_per_request: int) -> list[list[str]]:
    """Deterministic requests of mixed-language, mixed-length news sentences."""
    langs = sorted(NTREX_FILES)
    lines = {lang: ntrex_file(lang).read_text(encoding="utf-8").splitlines() for lang in langs}
    texts = [lines[langs[i % len(langs)]][(i * 7) % len(lines[langs[0]])] for i in range(requests * inputs_per_request)]
    return [texts[i:i + inputs_per_request] for i in range(0, len(texts), inputs_per_request)]


def measure_in_process(config: ServeConfig, texts: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    """``Embedder.encode`` on the replica's device, dtype and thread count, over all ``texts``."""
    import torch

    from babelforge.serve.service import load_embedder

    model = load_embedder(config, torch_threads=max(1, int(config.num_cpus)))
    batch_size = config.batching.max_batch_size
    model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up (allocator, kernels)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, max_length=config.limits.max_tokens)
    seconds = time.perf_counter() - started
    result = {"inputs": len(texts), "seconds": round(seconds, 4), "inputs_per_s": round(len(texts) / seconds, 1),
              "batch_size": batch_size, "device": str(model.device), "torch_threads": torch.get_num_threads()}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, vectors


async def warm_up(url: str, bodies: list[bytes]) -> None:
    """Untimed concurrent requests, so first-call costs stay out of the measurement."""
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as http:
        await asyncio.gather(*(http.post("/v1/embeddings", content=body) for body in bodies))


async def run_level(url: str, bodies: list[bytes], inputs_per_request: int, concurrency: int,
                    max_seconds: float) -> dict[str, Any]:
    pending = iter(bodies)
    latencies: list[float] = []
    errors: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=max(60.0, max_seconds), limits=limits) as http:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def client() -> None:
            for body in pending:
                if time.perf_counter() > deadline:
                    return
                sent = time.perf_counter()
                response = await http.post("/v1/embeddings", content=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors[response.status_code] = errors.get(response.status_code, 0) + 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    done = len(latencies)
    lat_ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"concurrency": concurrency, "requests_ok": done, "errors": errors,
            "timed_out": done + sum(errors.values()) < len(bodies), "inputs": done * inputs_per_request,
            "seconds": round(seconds, 3), "inputs_per_s": round(done * inputs_per_request / seconds, 1),
            "requests_per_s": round(done / seconds, 1),
            "latency_ms": {q: round(float(np.percentile(lat_ms, p)), 2)
                           for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}}


def load_test(config: ServeConfig, requests: list[list[str]], local_vectors: np.ndarray,
              args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    """Serve ``config`` on loopback, run every concurrency level; returns the levels and parity."""
    import ray
    from ray import serve

    from babelforge.utils.ray_env import init_ray

    bodies = [json.dumps({"input": r, "model": config.served_model_name, "encoding_format": "base64"}).encode()
              for r in requests]
    started_ray = not ray.is_initialized()
    init_ray()
    levels = []
    try:
        server = start_server(config)
        parity = float(np.abs(server.embed(requests[0]) - local_vectors[:len(requests[0])]).max())
        stats = serve.get_app_handle(config.app_name).batch_stats
        for concurrency in args.concurrency:
            asyncio.run(warm_up(server.url, bodies[:concurrency]))
            before = stats.remote().result()
            level = asyncio.run(run_level(server.url, bodies, args.inputs_per_request, concurrency, args.max_seconds))
            after = stats.remote().result()
            batches = max(1, after["batches"] - before["batches"])
            level["mean_inputs_per_batch"] = round((after["inputs"] - before["inputs"]) / batches, 1)
            levels.append(level)
        server.stop()
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return levels, parity


def main() -> None:
    args = parse_args()
    import ray
    import torch

    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        model_path = args.model
        if model_path is None:
            from babelforge.models.tiny import save_tiny_embedder

            model_path = str(save_tiny_embedder(Path(scratch) / "tiny", "xlm-roberta", matryoshka_dims=[16, 8]))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        overrides = [f"num_cpus={args.num_cpus}", f"num_gpus={args.num_gpus}", f"http.port={port}",
                     "auth.api_keys_env=null", f"limits.max_inputs={max(512, args.inputs_per_request)}",
                     "autoscaling.min_replicas=1", "autoscaling.max_replicas=1",
                     f"max_ongoing_requests={max(128, max(args.concurrency))}", *args.overrides]
        config = load_serve_config(None, model_path=model_path, overrides=overrides)
        requests = workload(args.requests, args.inputs_per_request)
        texts = [t for r in requests for t in r]
        # Measured before and after the load test (the host may be shared); the faster one is the baseline.
        baseline_before, local_vectors = measure_in_process(config, texts)
        levels, parity = load_test(config, requests, local_vectors, args)
        baseline_after, _ = measure_in_process(config, texts)

    baseline = max(baseline_before, baseline_after, key=lambda b: b["inputs_per_s"])
    print(f"in-process encode: {baseline['inputs_per_s']} inputs/s on {baseline['device']} "
          f"(before the load test {baseline_before['inputs_per_s']}, after {baseline_after['inputs_per_s']})")
    for level in levels:
        level["ratio_to_in_process"] = round(level["inputs_per_s"] / baseline["inputs_per_s"], 3)
        print(f"concurrency {level['concurrency']:>4}: {level['inputs_per_s']:>9} inputs/s  "
              f"p50 {level['latency_ms']['p50']:>8} ms  p99 {level['latency_ms']['p99']:>8} ms  "
              f"ratio {level['ratio_to_in_process']:.3f}  batch {level['mean_inputs_per_batch']}")
    report = {
        "benchmark": "serve_load",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                 "ray": ray.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "model": {"path": args.model or "tiny xlm-roberta (built on the fly, hidden 32)",
                  "name": config.served_model_name},
        "workload": {"requests_per_level": args.requests, "inputs_per_request": args.inputs_per_request,
                     "max_seconds_per_level": args.max_seconds, "texts": "NTREX sentences, 16 languages",
                     "mean_chars": round(float(np.mean([len(t) for t in texts])), 1), "encoding_format": "base64"},
        "server": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus, "replicas": 1,
                   "batching": config.batching.model_dump(), "max_tokens": config.limits.max_tokens},
        "in_process": {**baseline, "inputs_per_s_before_load": baseline_before["inputs_per_s"],
                       "inputs_per_s_after_load": baseline_after["inputs_per_s"]},
        "parity_max_abs_diff": parity,
        "levels": levels,
        "ratio_at_highest_concurrency": levels[-1]["ratio_to_in_process"] if levels else None,
        "best_ratio": max((lv["ratio_to_in_process"] for lv in levels), default=None),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
