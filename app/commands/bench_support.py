"""Pieces of `rxverify bench service`: photos, a ResNet-18 checkpoint, servers on loopback, load, raw pipeline.

Everything here is measurement plumbing; the service under test is the real one (`rxverify serve`).
"""

from __future__ import annotations

import http.client
import itertools
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PHOTO_SIZE = (1284, 960)  # the PMI photo size
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def render_photos(directory: Path, *, count: int, seed: int = 0) -> list[bytes]:
    """`count` synthetic PMI-like JPEG photos at 1284x960 (rendered once, then read from `directory`)."""
    from models.pmi import PMI_PRODUCTS
    from models.synth import SynthConfig, render_bottle

    directory.mkdir(parents=True, exist_ok=True)
    config = SynthConfig(aspect=PHOTO_SIZE[0] / PHOTO_SIZE[1])
    photos = []
    for index in range(count):
        path = directory / f"photo-{seed}-{index}.jpg"
        if not path.is_file():
            product = PMI_PRODUCTS[index % len(PMI_PRODUCTS)]
            image = render_bottle(product, rng=np.random.default_rng([seed, index]), image_size=PHOTO_SIZE[1],
                                  config=config)
            assert image.size == PHOTO_SIZE, image.size
            image.save(path, format="JPEG", quality=90)
        photos.append(path.read_bytes())
    return photos


def build_untrained_checkpoint(directory: Path, *, arch: str = "resnet18", image_size: int = 224, seed: int = 0) -> Path:
    """An UNTRAINED `arch` over the 20 PMI classes with a verdict policy fitted on simulated outputs.

    Good for timing only: the weights are random, so its verdicts mean nothing.
    """
    import torch

    from models.checkpoint import CheckpointMetadata, save_checkpoint
    from models.costs import CostMatrix
    from models.decision import fit_policy
    from models.networks import create_model
    from models.pmi import PMI_EXPERT_COSTS, PMI_NDCS

    if (directory / "model.safetensors").is_file():
        return directory
    torch.manual_seed(seed)
    model = create_model(arch, len(PMI_NDCS), input_shape=(3, image_size, image_size))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(PMI_NDCS)), 10)
    probs = rng.dirichlet(np.full(len(PMI_NDCS), 0.3), size=labels.size)
    probs[np.arange(labels.size), labels] += 2.0
    probs /= probs.sum(axis=1, keepdims=True)
    policy = fit_policy(probs, labels, cost_matrix=CostMatrix.from_pairs(PMI_NDCS, PMI_EXPERT_COSTS),
                        critical_cost=5.0, classes=PMI_NDCS, seed=seed)
    metadata = CheckpointMetadata(classes=PMI_NDCS, arch=arch, in_channels=3, image_size=image_size,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD, method="untrained-benchmark",
                                  decision=policy.to_dict())
    save_checkpoint(directory, model=model, metadata=metadata)
    return directory


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A server subprocess on loopback; `stop()` ends it (SIGTERM, then SIGKILL)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_server(argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, port: int,
                 ready_path: str = "/readyz", timeout_s: float = 300.0) -> Server:
    """Start `argv` with `env` added to the environment and wait until GET `ready_path` answers 200."""
    handle = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its whole life
    process = subprocess.Popen(list(argv), env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    server = Server(process, port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log_path.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", ready_path)
            if connection.getresponse().status == 200:
                connection.close()
                return server
            connection.close()
        except OSError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s: {log_path.read_text()[-3000:]}")


def multipart_body(photo: bytes, *, prescribed_ndc: str, boundary: str = "rxverify-bench") -> tuple[bytes, str]:
    """A pre-encoded multipart body (built once, so the load generator spends no CPU on encoding)."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prescribed_ndc\"\r\n\r\n{prescribed_ndc}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"bottle.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + photo + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass
class LoadResult:
    """Latencies and throughput of one load level."""

    concurrency: int
    requests: int
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    statuses: dict[int, int]

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (ms, requests per second over successful answers)."""
        ok = self.statuses.get(200, 0)
        ordered = sorted(self.latencies_s)
        return {"concurrency": self.concurrency, "requests": self.requests, "ok": ok,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "wall_s": round(self.wall_s, 3), "throughput_rps": round(ok / self.wall_s, 3),
                "p50_ms": round(percentile(ordered, 50) * 1000, 2), "p99_ms": round(percentile(ordered, 99) * 1000, 2),
                "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of a sorted sequence."""
    if not ordered:
        return float("nan")
    return float(np.percentile(np.asarray(ordered), q))


def drive(port: int, *, bodies: Sequence[tuple[bytes, str]], headers: Mapping[str, str], concurrency: int,
          requests: int, path: str = "/v1/verifications") -> LoadResult:
    """`concurrency` threads, each with one keep-alive connection, post `requests` bodies in total."""
    counter = itertools.count()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            while (index := next(counter)) < requests:
                body, content_type = bodies[index % len(bodies)]
                started = time.perf_counter()
                try:
                    connection.request("POST", path, body=body, headers={**headers, "Content-Type": content_type})
                    response = connection.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException):
                    status = 0
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(elapsed)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(concurrency, requests, time.perf_counter() - started, latencies, statuses)


class RawPipeline:
    """The limit without HTTP, in this process: the engine engineer's `measure_pipeline` (stage medians,
    single-image latency, serial decode-then-forward batches) plus a pipelined variant (a decode thread
    running ahead of full batches). The raw limit is the better of the two throughputs."""

    def __init__(self, checkpoint: Path, photos: Sequence[bytes], *, device: str, torch_threads: int | None,
                 batch_size: int, decode_workers: int, channels_last: str = "auto", autocast: bool = False) -> None:
        from app.inference.images import ImageLimits, configure_pillow
        from app.inference.served import load_served_model
        from models.checkpoint import load_checkpoint
        from models.runtime import select_device, serve_channels_last, set_cpu_threads

        set_cpu_threads(torch_threads)
        configure_pillow(max_pixels=ImageLimits().max_pixels)
        on = select_device(device)
        self.served = load_served_model(checkpoint, version="raw", device=on, channels_last=serve_channels_last(
            on, autocast=autocast, preference=channels_last))
        # The model as loaded, to time what prepare_for_inference saves (the naive server runs it so).
        self.eager = load_checkpoint(checkpoint, device=self.served.device).model.eval()
        self.limits = ImageLimits()
        self.photos = list(photos)
        self.batch_size, self.decode_workers = batch_size, decode_workers
        self.figures: list[dict[str, Any]] = []
        self.pipelined: list[tuple[int, float]] = []

    def _preprocess(self, index: int) -> Any:
        return self.served.preprocess(self.photos[index % len(self.photos)], limits=self.limits)

    def stages(self, repeats: int) -> None:
        """One round of `app.inference.bench.measure_pipeline` (single image, stages, serial batches)."""
        from app.inference.bench import measure_pipeline

        figures = measure_pipeline(self.served, images=self.photos, batch_size=self.batch_size, repeats=repeats,
                                   warmup=1, limits=self.limits, eager=self.eager).to_dict()
        self.figures.append(figures)
        print(f"  raw: single image {figures['single_image_ms']:.1f} ms, serial {figures['throughput_ips']:.2f} img/s",
              flush=True)

    def throughput(self, requests: int) -> None:
        """One round: `requests` images decoded by a thread pool running ahead while full batches go forward."""
        from app.inference.served import forward_probabilities

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.decode_workers) as pool:
            futures = [pool.submit(self._preprocess, i) for i in range(requests)]
            for first in range(0, requests, self.batch_size):
                forward_probabilities(self.served, [f.result() for f in futures[first:first + self.batch_size]])
        self.pipelined.append((requests, time.perf_counter() - started))
        print(f"  raw: pipelined {requests / self.pipelined[-1][1]:.2f} img/s", flush=True)

    def summary(self) -> dict[str, Any]:
        """Pooled figures over the rounds (medians of the round medians for latencies), and each round's."""
        images, wall = sum(n for n, _ in self.pipelined), sum(w for _, w in self.pipelined)
        serial = statistics.fmean(f["throughput_ips"] for f in self.figures)
        pipelined = images / wall
        stage_keys = ("decode_ms", "full_decode_ms", "preprocess_ms", "forward_1_ms", "forward_batch_ms",
                      "forward_1_other_layout_ms", "forward_batch_other_layout_ms", "forward_1_eager_ms",
                      "forward_batch_eager_ms")
        return {"throughput_rps": round(max(serial, pipelined), 3), "serial_rps": round(serial, 3),
                "pipelined_rps": round(pipelined, 3),
                "single_image_p50_ms": round(statistics.median(f["single_image_ms"] for f in self.figures), 2),
                "stages_ms": {k: round(statistics.median(f[k] for f in self.figures), 2) for k in stage_keys},
                "rounds_rps": [round(max(f["throughput_ips"], n / w), 3)
                               for f, (n, w) in zip(self.figures, self.pipelined, strict=True)],
                "rounds_single_p50_ms": [round(f["single_image_ms"], 2) for f in self.figures],
                "batch_size": self.batch_size, "decode_workers": self.decode_workers,
                "torch_threads": self.figures[0]["torch_threads"] if self.figures else None,
                "device": str(self.served.device), "channels_last": self.served.channels_last}


def python() -> str:
    """This interpreter (servers run under the same environment)."""
    return sys.executable


def scrape_metrics(port: int, names: Sequence[str]) -> dict[str, float]:
    """The named samples (exact name, labels included) from a local service's /metrics; 0.0 when absent."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    found = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found
