"""`rxverify bench service`: the real server on loopback under concurrent load, against two references.

1. raw pipeline limit: decode + EvalPreset + batched forward in one process, no HTTP (measured before
   and after the servers; the mean of the two runs is the reference, both are reported);
2. the service: `rxverify serve` (uvicorn, one worker) on a migrated, seeded SQLite data dir with the
   checkpoint registered and active, driven by 1, 4 and 16 keep-alive clients posting 1284x960 JPEGs;
3. a naive server (app.commands.bench_naive): one forward per request, full decode, no batching.

Ratios: `throughput_ratio` = service rps at c16 / raw pipeline rps; `p50_ratio` = service p50 at c1 /
single-image pipeline p50; `vs_naive` = service rps at c16 / naive rps at c16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.commands import bench_support as support

TARGETS = {"throughput_ratio": ">= 0.8", "p50_ratio": "<= 1.25", "vs_naive": "> 1 (clearly)"}
# The service runs float32 here, like the raw pipeline and the naive server (its default; RXVERIFY_INFERENCE_AMP).
SERVICE_AMP = False


@dataclass(frozen=True)
class BenchConfig:
    """What to run (see `register` for the meaning of each option)."""

    json_out: Path | None
    model: Path | None
    requests: int
    device: str
    concurrency: tuple[int, ...]
    torch_threads: int
    max_batch_size: int
    batch_wait_ms: float
    photos: int
    single_reps: int
    decode_workers: int
    work_dir: Path | None
    rounds: int = 3
    inference_workers: int = 1
    arch: str = "resnet18"  # of the untrained model served when `model` is None
    image_size: int = 224
    channels_last: str = "auto"  # RXVERIFY_INFERENCE_CHANNELS_LAST, for the service and the raw pipeline


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add `bench service` to the `rxverify` parser."""
    parser = groups["bench"].add_parser("service", help="throughput and latency of the verification service")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help="write the results here")
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint to serve (default: an untrained --arch at --image-size over the 20 PMI classes)")
    parser.add_argument("--arch", default="resnet18",
                        help="architecture of the untrained default model (default resnet18; tiny_cnn isolates the "
                             "service's own per-request cost)")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the untrained default model")
    parser.add_argument("--requests", type=int, default=96, help="measured requests per concurrency level (all rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (service, naive and raw in each)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch intra-op threads for all three (default: one core left for decode and HTTP)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, help="engine max wait after a batch's first request")
    parser.add_argument("--photos", type=int, default=8, help="distinct 1284x960 photos to rotate through")
    parser.add_argument("--stage-repeats", dest="single_reps", type=int, default=2,
                        help="repeats of app.inference.bench.measure_pipeline per round (x3 for single images)")
    parser.add_argument("--decode-workers", type=int, default=1, help="decode threads of the raw pipeline")
    parser.add_argument("--inference-workers", type=int, default=None,
                        help="the service's RXVERIFY_INFERENCE_WORKERS (batches computed at once; default: 1 on a "
                             "GPU, else CPU cores // torch threads, the setting's documented CPU rule)")
    parser.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                        help="the served layout (RXVERIFY_INFERENCE_CHANNELS_LAST) for the service and the raw "
                             "pipeline; the raw stages time the other layout and the model as loaded as well")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep photos, data and logs here")
    parser.set_defaults(func=handle)


def default_inference_workers(device: str, torch_threads: int) -> int:
    """RXVERIFY_INFERENCE_WORKERS as the Configuration table advises: 1 on a GPU; on a CPU host as many
    batches at once as fit the cores (torch_threads x inference_workers <= cores)."""
    from models.runtime import select_device

    if select_device(device).type == "cuda":
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, torch_threads))


def handle(args: argparse.Namespace) -> int:
    """Run the benchmark, print a summary, write the JSON."""
    config = BenchConfig(json_out=args.json_out, model=args.model, requests=args.requests, device=args.device,
                         concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                         torch_threads=args.torch_threads, max_batch_size=args.max_batch_size,
                         batch_wait_ms=args.batch_wait_ms, photos=args.photos, single_reps=args.single_reps,
                         decode_workers=args.decode_workers, work_dir=args.work_dir,
                         rounds=args.rounds, arch=args.arch, image_size=args.image_size,
                         channels_last=args.channels_last,
                         inference_workers=args.inference_workers or default_inference_workers(args.device,
                                                                                                args.torch_threads))
    result = run_bench(config)
    text = json.dumps(result, indent=2)
    if config.json_out is not None:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(text + "\n")
    print(text)
    return 0


def _prepare_data_dir(data_dir: Path, checkpoint: Path) -> str:
    """Migrate and seed a fresh SQLite data dir, register + activate the checkpoint; a client API key."""
    from app import migrate
    from app.config import Settings
    from app.db import Database
    from app.orm import Role
    from app.services.api_keys import create_api_key
    from app.services.audit import Actor
    from app.services.catalog_seed import seed_pmi
    from app.services.serving import install_checkpoint

    settings = Settings(data_dir=data_dir)
    settings.ensure_dirs()
    migrate.upgrade(settings)
    database = Database(settings)
    try:
        with database.session() as session:
            seed_pmi(session, actor=Actor.cli("bench service"), max_cost=settings.max_cost)
            _key, token = create_api_key(session, role=Role.CLIENT, name="bench client", actor=Actor.cli("bench"))
    finally:
        database.dispose()
    install_checkpoint(settings, checkpoint, actor_name="cli:bench service")
    return token


def _scrape(port: int) -> dict[str, float]:
    """Batch-size and queue-wait sums and counts from the service's /metrics."""
    return support.scrape_metrics(port, ("rxverify_inference_batch_size_sum", "rxverify_inference_batch_size_count",
                                 "rxverify_inference_queue_wait_seconds_sum",
                                 "rxverify_inference_queue_wait_seconds_count"))


def _engine_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    batches = after["rxverify_inference_batch_size_count"] - before["rxverify_inference_batch_size_count"]
    items = after["rxverify_inference_queue_wait_seconds_count"] - before["rxverify_inference_queue_wait_seconds_count"]
    batch_sum = after["rxverify_inference_batch_size_sum"] - before["rxverify_inference_batch_size_sum"]
    wait_sum = after["rxverify_inference_queue_wait_seconds_sum"] - before["rxverify_inference_queue_wait_seconds_sum"]
    return {"mean_batch_size": round(batch_sum / batches, 2) if batches else None,
            "mean_queue_wait_ms": round(wait_sum / items * 1000, 2) if items else None}


def _merge(results: list[support.LoadResult]) -> support.LoadResult:
    """Pool the rounds of one level: all latencies, summed requests and wall time."""
    statuses: dict[int, int] = {}
    for result in results:
        for status, count in result.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    return support.LoadResult(results[0].concurrency, sum(r.requests for r in results),
                              sum(r.wall_s for r in results), [x for r in results for x in r.latencies_s], statuses)


class Rounds:
    """Interleaved measurements: every round runs each measurement once, so a noisy neighbour hits all alike."""

    def __init__(self, *, bodies: list[tuple[bytes, str]], headers: dict[str, str], per_round: int) -> None:
        self.bodies, self.headers, self.per_round = bodies, headers, per_round
        self.loads: dict[str, list[support.LoadResult]] = {}
        self.engine: dict[str, list[dict[str, float]]] = {}

    def load(self, name: str, port: int, concurrency: int, *, scrape: bool = False) -> support.LoadResult:
        """One load level for one round (`name` like `service.c16`)."""
        before = _scrape(port) if scrape else None
        result = support.drive(port, bodies=self.bodies, headers=self.headers, concurrency=concurrency,
                               requests=self.per_round)
        if before is not None:
            self.engine.setdefault(name, []).append({k: v for k, v in _scrape(port).items()}
                                                    | {f"before:{k}": v for k, v in before.items()})
        self.loads.setdefault(name, []).append(result)
        summary = result.summary()
        print(f"  {name}: {summary['throughput_rps']} req/s, p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
              f"statuses {summary['statuses']}", flush=True)
        return result

    def summary(self, name: str) -> dict[str, Any]:
        """Pooled figures of a level over all rounds (+ mean batch size and queue wait for the service)."""
        pooled = _merge(self.loads[name]).summary()
        pooled["rounds_rps"] = [r.summary()["throughput_rps"] for r in self.loads[name]]
        if name in self.engine:
            samples = self.engine[name]
            after = {k: sum(s[k] for s in samples) for k in samples[0] if not k.startswith("before:")}
            before = {k: sum(s[f"before:{k}"] for s in samples) for k in after}
            pooled.update(_engine_stats(before, after))
        return pooled


def _machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available() and device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document."""
    from models.pmi import PMI_PRODUCTS

    work = config.work_dir or Path(tempfile.mkdtemp(prefix="rxverify-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    print(f"rendering {config.photos} photos at 1284x960 in {work}", flush=True)
    photos = support.render_photos(work / "photos", count=config.photos)
    untrained = config.model is None
    checkpoint = config.model or support.build_untrained_checkpoint(
        work / f"{config.arch}-{config.image_size}-untrained", arch=config.arch, image_size=config.image_size)
    token = _prepare_data_dir(work / "data", checkpoint)
    bodies = [support.multipart_body(photo, prescribed_ndc=PMI_PRODUCTS[i % len(PMI_PRODUCTS)].ndc)
              for i, photo in enumerate(photos)]
    threads = str(config.torch_threads)
    per_round = max(1, config.requests // config.rounds)
    pipeline = support.RawPipeline(checkpoint, photos, device=config.device, torch_threads=config.torch_threads,
                                   batch_size=config.max_batch_size, decode_workers=config.decode_workers,
                                   channels_last=config.channels_last, autocast=SERVICE_AMP)
    port, naive_port = support.free_port(), support.free_port()
    env = {"RXVERIFY_DATA_DIR": str(work / "data"), "RXVERIFY_DEVICE": config.device,
           "RXVERIFY_TORCH_THREADS": threads, "RXVERIFY_MAX_BATCH_SIZE": str(config.max_batch_size),
           "RXVERIFY_MAX_BATCH_WAIT_MS": str(config.batch_wait_ms), "RXVERIFY_LOG_FORMAT": "json",
           "RXVERIFY_INFERENCE_WORKERS": str(config.inference_workers),
           "RXVERIFY_INFERENCE_AMP": str(SERVICE_AMP).lower(),
           "RXVERIFY_INFERENCE_CHANNELS_LAST": config.channels_last,
           # One pooled connection per concurrent request: overflow connections are opened and closed per use.
           "RXVERIFY_DB_POOL_SIZE": str(max(config.concurrency) + 4)}
    naive_env = {"RXVERIFY_BENCH_CHECKPOINT": str(checkpoint), "RXVERIFY_DEVICE": config.device,
                 "RXVERIFY_TORCH_THREADS": threads}
    print(f"service on 127.0.0.1:{port}, naive server on 127.0.0.1:{naive_port}", flush=True)
    # --no-worker: the embedded training worker would poll its broker beside the API; this measures the API.
    server = support.start_server([support.python(), "-m", "app.cli", "serve", "--no-worker", "--host",
                                   "127.0.0.1", "--port", str(port)], env=env, log_path=work / "service.log", port=port)
    naive_server = None
    try:
        naive_server = support.start_server(
            [support.python(), "-m", "uvicorn", "app.commands.bench_naive:create_naive_app", "--factory", "--host",
             "127.0.0.1", "--port", str(naive_port), "--workers", "1", "--log-level", "warning", "--no-access-log",
             "--http", "h11"],  # the parser `rxverify serve` runs
            env=naive_env, log_path=work / "naive.log", port=naive_port)
        rounds = Rounds(bodies=bodies, headers={"X-API-Key": token}, per_round=per_round)
        low, top = min(config.concurrency), max(config.concurrency)
        for target, level in ((port, c) for c in config.concurrency):  # warm-up: connections, pools, allocator
            support.drive(target, bodies=bodies, headers=rounds.headers, concurrency=level, requests=2 * level)
        support.drive(naive_port, bodies=bodies, headers=rounds.headers, concurrency=top, requests=2 * top)
        for index in range(config.rounds):
            print(f"round {index + 1}/{config.rounds}", flush=True)
            pipeline.stages(config.single_reps)
            rounds.load(f"service.c{low}", port, low, scrape=True)
            pipeline.throughput(per_round)
            for level in sorted(set(config.concurrency) - {low}):
                rounds.load(f"service.c{level}", port, level, scrape=True)
            rounds.load(f"naive.c{top}", naive_port, top)
            if low != top:
                rounds.load(f"naive.c{low}", naive_port, low)
    finally:
        server.stop()
        if naive_server is not None:
            naive_server.stop()
    service = {f"c{c}": rounds.summary(f"service.c{c}") for c in config.concurrency}
    naive = {f"c{c}": rounds.summary(f"naive.c{c}") for c in sorted({low, top})}
    raw = pipeline.summary()
    ratios = {"throughput_ratio": round(service[f"c{top}"]["throughput_rps"] / raw["throughput_rps"], 3),
              "p50_ratio": round(service[f"c{low}"]["p50_ms"] / raw["single_image_p50_ms"], 3),
              "vs_naive": round(service[f"c{top}"]["throughput_rps"] / naive[f"c{top}"]["throughput_rps"], 3)}
    per_round_ratios = {
        "throughput_ratio": [round(s.summary()["throughput_rps"] / r, 3)
                             for s, r in zip(rounds.loads[f"service.c{top}"], raw["rounds_rps"], strict=True)],
        "p50_ratio": [round(s.summary()["p50_ms"] / r, 3)
                      for s, r in zip(rounds.loads[f"service.c{low}"], raw["rounds_single_p50_ms"], strict=True)],
        "vs_naive": [round(s.summary()["throughput_rps"] / n.summary()["throughput_rps"], 3)
                     for s, n in zip(rounds.loads[f"service.c{top}"], rounds.loads[f"naive.c{top}"], strict=True)]}
    return {
        **ratios,
        "per_round_ratios": per_round_ratios,
        "targets": TARGETS,
        "device": raw["device"],
        "torch_threads": config.torch_threads,
        "model": {"checkpoint": str(checkpoint), "arch": config.arch if untrained else "from --model",
                  "image_size": config.image_size if untrained else None, "untrained": untrained,
                  "note": ("untrained weights (random init) with a policy fitted on simulated outputs: the timings "
                           "are real, the verdicts mean nothing") if untrained else "as given"},
        "engine": {"max_batch_size": config.max_batch_size, "max_batch_wait_ms": config.batch_wait_ms,
                   "adaptive_wait": True, "inference_amp": SERVICE_AMP,
                   "inference_workers": config.inference_workers, "uvicorn_workers": 1,
                   "db_pool_size": max(config.concurrency) + 4, "jpeg_draft": True,
                   "model_prepared": (f"BatchNorm folded, {'channels-last' if raw['channels_last'] else 'NCHW'} "
                                      f"(--channels-last {config.channels_last}; the naive server runs the model "
                                      "as loaded)"),
                   "channels_last": raw["channels_last"],
                   "database": "sqlite (embedded), one row per verdict", "embedded_training_worker": False},
        "photos": {"count": len(photos), "size": list(support.PHOTO_SIZE),
                   "mean_bytes": round(sum(map(len, photos)) / len(photos))},
        "rounds": config.rounds, "requests_per_level": per_round * config.rounds,
        "service": service,
        "naive": naive,
        "raw": raw,
        "machine": {**_machine(config.device), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "elapsed_s": round(time.time() - started, 1),
        "work_dir": str(work),
    }
