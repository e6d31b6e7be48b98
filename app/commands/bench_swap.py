"""`rxverify bench swap`: promote the active model back and forth under steady load against the real server.

It serves model A with `rxverify serve` on loopback, drives it with `--concurrency` clients posting PMI-size
photos, measures a steady window, then promotes B, A, B, ... (`--swaps` times) through the admin API
and records, for each promotion, how long until answers come from the new version. Reported: failed
requests (any non-200), swap latency, p99 in steady state, during swaps and between them, and the
server's resident memory before and after the swaps. JSON keys: `failed_requests`, `max_swap_seconds`,
`p99_ratio` (p99 during swaps / steady p99) and `rss_growth_ratio` (RSS after / before).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.commands import bench_support as support

SWAP_MARGIN_S = 0.25  # requests this long after the switch still count as "during the swap" (old model draining)


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add `bench swap` to the `rxverify` parser."""
    parser = groups["bench"].add_parser("swap", help="hot-swap under load: failures, swap latency, p99, memory")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help="write the results here")
    parser.add_argument("--swaps", type=int, default=10, help="promotions, alternating B and A (default 10)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steady-s", type=float, default=10.0, help="steady-state window before the swaps")
    parser.add_argument("--hold-s", type=float, default=3.0, help="time under load between two promotions")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the two ResNet-18 models")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--photos", type=int, default=8, help="distinct 1284x960 photos to rotate through")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep photos, data and logs here")
    parser.set_defaults(func=handle)


@dataclass(frozen=True)
class Answer:
    """One request: when it started and ended (monotonic s), its status and the version that answered."""

    started: float
    ended: float
    status: int
    version: int | None


class Load:
    """`concurrency` keep-alive clients posting verifications until stopped."""

    def __init__(self, port: int, *, bodies: list[tuple[bytes, str]], key: str, concurrency: int) -> None:
        self.port, self.bodies, self.key = port, bodies, key
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(concurrency)]

    def start(self) -> None:
        """Start the clients."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the clients after their current request."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self, index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        n = index
        while not self._stop.is_set():
            body, content_type = self.bodies[n % len(self.bodies)]
            n += 1
            started = time.monotonic()
            version = None
            try:
                connection.request("POST", "/v1/verifications", body=body,
                                   headers={"X-API-Key": self.key, "Content-Type": content_type})
                response = connection.getresponse()
                payload = response.read()
                status = response.status
                if status == 200:
                    version = json.loads(payload).get("model_version")
            except (OSError, http.client.HTTPException, ValueError):
                status = 0
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            with self._lock:
                self.answers.append(Answer(started, time.monotonic(), status, version))
        connection.close()

    def snapshot(self) -> list[Answer]:
        """The answers so far."""
        with self._lock:
            return list(self.answers)


def _rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _post_json(port: int, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"X-API-Key": key,
                                                                          "Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read() or b"{}")
        if response.status != 200:
            raise RuntimeError(f"POST {path} answered {response.status}: {payload}")
        return dict(payload)
    finally:
        connection.close()


def _prepare(data_dir: Path, checkpoints: tuple[Path, Path]) -> tuple[str, str, int, int]:
    """Migrate and seed a fresh SQLite data dir; register A and B, activate A; client and admin keys."""
    from app import migrate
    from app.config import Settings
    from app.db import Database
    from app.orm import Role
    from app.services.api_keys import create_api_key
    from app.services.audit import Actor
    from app.services.catalog_seed import seed_pmi
    from app.services.model_registry import activate_model, register_checkpoint

    settings = Settings(data_dir=data_dir)
    settings.ensure_dirs()
    migrate.upgrade(settings)
    database = Database(settings)
    actor = Actor.cli("bench swap")
    try:
        with database.session() as session:
            seed_pmi(session, actor=actor, max_cost=settings.max_cost)
            _k, client = create_api_key(session, role=Role.CLIENT, name="bench client", actor=actor)
            _k, admin = create_api_key(session, role=Role.ADMIN, name="bench admin", actor=actor)
            a = register_checkpoint(session, source=checkpoints[0], settings=settings, actor=actor)
            b = register_checkpoint(session, source=checkpoints[1], settings=settings, actor=actor)
            activate_model(session, model_version_id=a.id, actor=actor, reason="bench swap: model A")
            return client, admin, a.id, b.id
    finally:
        database.dispose()


def _p99_ms(answers: list[Answer]) -> float | None:
    latencies = sorted(a.ended - a.started for a in answers if a.status == 200)
    return round(support.percentile(latencies, 99) * 1000, 2) if latencies else None


def _wait_for_version(load: Load, version: int, *, after: float, timeout_s: float = 60.0) -> float:
    """Monotonic end time of the first answer from `version` to a request started after `after`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hits = [a.ended for a in load.snapshot() if a.started >= after and a.version == version]
        if hits:
            return min(hits)
        time.sleep(0.01)
    raise RuntimeError(f"model {version} was not served within {timeout_s:.0f} s of its promotion")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document."""
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="rxverify-bench-swap-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = (support.build_untrained_checkpoint(work / "model-a", image_size=args.image_size, seed=0),
                   support.build_untrained_checkpoint(work / "model-b", image_size=args.image_size, seed=1))
    photos = support.render_photos(work / "photos", count=args.photos)
    data_dir = work / "data"
    client_key, admin_key, model_a, model_b = _prepare(data_dir, checkpoints)
    from models.pmi import PMI_PRODUCTS

    bodies = [support.multipart_body(photo, prescribed_ndc=PMI_PRODUCTS[i % len(PMI_PRODUCTS)].ndc)
              for i, photo in enumerate(photos)]
    port = support.free_port()
    env = {"RXVERIFY_DATA_DIR": str(data_dir), "RXVERIFY_DEVICE": args.device,
           "RXVERIFY_TORCH_THREADS": str(args.torch_threads), "RXVERIFY_LOG_FORMAT": "json"}
    print(f"server on 127.0.0.1:{port} (logs in {work / 'server.log'})", flush=True)
    server = support.start_server([support.python(), "-m", "app.cli", "serve", "--no-worker", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, log_path=work / "server.log", port=port)
    load = Load(port, bodies=bodies, key=client_key, concurrency=args.concurrency)
    swaps: list[dict[str, Any]] = []
    try:
        load.start()
        time.sleep(3.0)  # warm the server and the clients up; not measured
        steady_from = time.monotonic()
        time.sleep(args.steady_s)
        steady_to = time.monotonic()
        rss_before = _rss_mb(server.process.pid)
        print(f"steady: p99 {_p99_ms([a for a in load.snapshot() if a.started >= steady_from])} ms, "
              f"RSS {rss_before:.0f} MB", flush=True)
        for index in range(args.swaps):
            target = model_b if index % 2 == 0 else model_a
            promoted_at = time.monotonic()
            _post_json(port, f"/v1/admin/models/{target}/promote", {"force": True, "reason": "bench swap"}, admin_key)
            served_at = _wait_for_version(load, target, after=promoted_at)
            swaps.append({"to": target, "promoted_at": promoted_at, "served_at": served_at,
                          "seconds": round(served_at - promoted_at, 3)})
            print(f"swap {index + 1}/{args.swaps} to model {target}: {served_at - promoted_at:.2f} s", flush=True)
            time.sleep(args.hold_s)
        rss_after = _rss_mb(server.process.pid)
    finally:
        load.stop()
        metrics = _scrape_swaps(port) if server.process.poll() is None else {}
        server.stop()
    return _report(args, load.snapshot(), swaps=swaps, steady=(steady_from, steady_to), rss=(rss_before, rss_after),
                   server_metrics=metrics)


def _scrape_swaps(port: int) -> dict[str, float]:
    return support.scrape_metrics(port, ("rxverify_model_swap_seconds_sum", "rxverify_model_swap_seconds_count",
                                 "rxverify_model_swap_failed", 'rxverify_model_swaps_total{outcome="failure"}'))


def _report(args: argparse.Namespace, answers: list[Answer], *, swaps: list[dict[str, Any]],
            steady: tuple[float, float], rss: tuple[float, float], server_metrics: dict[str, float]) -> dict[str, Any]:
    windows = [(s["promoted_at"], s["served_at"] + SWAP_MARGIN_S) for s in swaps]

    def in_swap(answer: Answer) -> bool:
        return any(answer.started < end and answer.ended > start for start, end in windows)

    measured = [a for a in answers if a.started >= steady[0]]
    steady_answers = [a for a in measured if a.ended <= steady[1]]
    swap_answers = [a for a in measured if in_swap(a)]
    between = [a for a in measured if a.started > steady[1] and not in_swap(a)]
    steady_p99, swap_p99 = _p99_ms(steady_answers), _p99_ms(swap_answers)
    failed = [a for a in measured if a.status != 200]
    swap_count = server_metrics.get("rxverify_model_swap_seconds_count", 0.0)
    return {
        "failed_requests": len(failed),
        "max_swap_seconds": max((s["seconds"] for s in swaps), default=None),
        "p99_ratio": round(swap_p99 / steady_p99, 3) if swap_p99 and steady_p99 else None,
        "rss_growth_ratio": round(rss[1] / rss[0], 4),
        "requests": len(measured), "failed_statuses": sorted({a.status for a in failed}),
        "swaps": len(swaps), "swap_seconds": [s["seconds"] for s in swaps],
        "mean_swap_seconds": round(sum(s["seconds"] for s in swaps) / len(swaps), 3) if swaps else None,
        "server_load_warmup_seconds_mean": (round(server_metrics["rxverify_model_swap_seconds_sum"] / swap_count, 3)
                                            if swap_count else None),
        "server_swap_failures": server_metrics.get('rxverify_model_swaps_total{outcome="failure"}', 0.0),
        "steady_p99_ms": steady_p99, "swap_p99_ms": swap_p99, "between_swaps_p99_ms": _p99_ms(between),
        "steady_requests": len(steady_answers), "swap_requests": len(swap_answers),
        "rss_before_mb": round(rss[0], 1), "rss_after_mb": round(rss[1], 1),
        "concurrency": args.concurrency, "model": f"resnet18 @ {args.image_size} px (untrained, timing only)",
        "device": args.device, "torch_threads": args.torch_threads, "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def handle(args: argparse.Namespace) -> int:
    """Run the benchmark, print the JSON, write it to --json."""
    result = run_bench(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    return 0 if result["failed_requests"] == 0 else 1
