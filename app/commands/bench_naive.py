"""The naive server of `rxverify bench service`: what a first FastAPI/Starlette model server looks like.

One forward pass per request (no batching, no queue), a full-resolution decode (no JPEG draft), the
framework's form parser, the forward run in the framework's thread pool, and the model as
`load_checkpoint` returns it (the service serves `prepare_for_inference`'s copy: BatchNorm folded,
channels-last). Same checkpoint, same EvalPreset, same device and torch threads as the real service. Not for production: no auth, no audit.
Run by uvicorn as `app.commands.bench_naive:create_naive_app` (factory) with RXVERIFY_BENCH_CHECKPOINT set.
"""

from __future__ import annotations

import io
import os

import torch
from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from models.checkpoint import load_checkpoint
from models.evaluate import probabilities_from_outputs
from models.runtime import select_device, set_cpu_threads
from models.transforms import EvalPreset

CHECKPOINT_ENV = "RXVERIFY_BENCH_CHECKPOINT"


def create_naive_app() -> Starlette:
    """The naive app for the checkpoint named by RXVERIFY_BENCH_CHECKPOINT."""
    threads = os.environ.get("RXVERIFY_TORCH_THREADS")
    set_cpu_threads(int(threads) if threads else None)
    device = select_device(os.environ.get("RXVERIFY_DEVICE", "auto"))
    loaded = load_checkpoint(os.environ[CHECKPOINT_ENV], device=device)
    model, metadata = loaded.model, loaded.metadata
    preset = EvalPreset.from_metadata(metadata)

    def predict(data: bytes) -> dict[str, object]:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")  # full decode
        batch = preset(image).unsqueeze(0).to(device)
        with torch.inference_mode():  # float32, as the service serves by default
            outputs = model(batch)
        probs = probabilities_from_outputs(outputs.float(), metadata.output_kind, temperature=metadata.temperature)[0]
        best = int(probs.argmax())
        return {"predicted_ndc": metadata.classes[best], "probability": float(probs[best])}

    async def verify(request: Request) -> JSONResponse:
        async with request.form() as form:
            upload = form["image"]
            data = upload if isinstance(upload, str) else await upload.read()
        body = await run_in_threadpool(predict, data.encode() if isinstance(data, str) else data)
        return JSONResponse({**body, "prescribed_ndc": str(form.get("prescribed_ndc"))})

    async def ready(_request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    with torch.inference_mode():  # warm-up, as the real service does
        model(torch.zeros(1, metadata.in_channels, metadata.image_size, metadata.image_size, device=device))
    return Starlette(routes=[Route("/v1/verifications", verify, methods=["POST"]), Route("/readyz", ready)])
