"""Every bad input to POST /v1/verifications gets its own status and problem type, and the server stays ready."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.orm import Role, Verification
from tests.app.factories import count_rows
from tests.app.model_factory import (
    FAVOURITE,
    NOT_SERVED,
    blank_photo,
    cached_checkpoint,
    image_bytes,
    jpeg_photo,
    multipart,
    post_verification,
    served_settings,
)
from tests.conftest import ApiEnv

UPLOAD_LIMIT = 100_000


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR with a correct CRC) declaring width x height, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated_webp() -> bytes:
    """Two frames: which one shows the bottle?"""
    import io

    from PIL import Image

    frames = [Image.new("RGB", (64, 64), colour) for colour in ("navy", "orange")]
    out = io.BytesIO()
    frames[0].save(out, format="WEBP", save_all=True, append_images=frames[1:], duration=100)
    return out.getvalue()


@pytest.fixture(scope="module")
def bad_env(seeded_sqlite_template: tuple[Path, dict[Role, str]],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiEnv]:
    """One served app for the whole module (these requests change nothing but the log)."""
    template, keys = seeded_sqlite_template
    root = tmp_path_factory.mktemp("bad-input")
    settings = served_settings(template, root / "data", checkpoint=cached_checkpoint(root),
                               max_upload_bytes=UPLOAD_LIMIT, max_image_pixels=4_000_000)
    with TestClient(create_app(settings)) as client:
        yield ApiEnv(settings, client, dict(keys))


def assert_problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == f"https://rxverify.dev/problems/{slug}" and body["status"] == status and body["detail"]
    return body


def assert_still_ready(env: ApiEnv) -> None:
    ready = env.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert post_verification(env.client, env.keys[Role.CLIENT], image=jpeg_photo()).status_code == 200


JPEG = jpeg_photo(size=(120, 90))
UPLOAD_CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "empty file": (dict(image=b""), 422, "image-empty"),
    "text file named .jpg": (dict(image=b"this is not a photo\n" * 20, filename="bottle.jpg"), 415,
                             "unsupported-image-format"),
    "GIF": (dict(image=image_bytes("GIF"), filename="bottle.gif", content_type="image/gif"), 415,
            "unsupported-image-format"),
    "BMP": (dict(image=image_bytes("BMP"), filename="bottle.bmp"), 415, "unsupported-image-format"),
    "PNG header claiming 50000x50000": (dict(image=png_claiming(50_000, 50_000), filename="bottle.png"), 422,
                                        "image-too-many-pixels"),
    "truncated JPEG": (dict(image=JPEG[: len(JPEG) // 2]), 422, "corrupt-image"),
    "corrupt PNG": (dict(image=image_bytes("PNG")[:40], filename="bottle.png"), 422, "corrupt-image"),
    # A model names some product for any input; a thumbnail or a 1-pixel strip is refused instead.
    "1x1 photo": (dict(image=image_bytes("PNG", size=(1, 1)), filename="bottle.png"), 422, "image-too-small"),
    "1x3000 strip": (dict(image=jpeg_photo(size=(3000, 1))), 422, "image-too-small"),
    "31x200 photo": (dict(image=jpeg_photo(size=(31, 200))), 422, "image-too-small"),
    "oversized": (dict(image=b"\xff\xd8\xff" + b"\0" * (UPLOAD_LIMIT + 10)), 413, "image-too-large"),
    # A covered lens or an empty white frame: the model would still name a product (once with `match`).
    "white frame": (dict(image=blank_photo("white"), filename="bottle.png"), 422, "image-blank"),
    "black frame with sensor noise": (dict(image=blank_photo("black", noise=1.0), filename="bottle.png"), 422,
                                      "image-blank"),
    "animated WebP": (dict(image=animated_webp(), filename="bottle.webp"), 422, "animated-image"),
    "unknown NDC": (dict(image=JPEG, ndc="12345-6789-01"), 422, "unknown-ndc"),
    "malformed NDC": (dict(image=JPEG, ndc="not-an-ndc"), 422, "malformed-ndc"),
    "NDC the model does not know": (dict(image=JPEG, ndc=NOT_SERVED), 422, "product-not-in-model"),
    "blank NDC": (dict(image=JPEG, ndc="   "), 422, "validation-error"),
    "NDC too long": (dict(image=JPEG, ndc="1" * 65), 422, "validation-error"),
    "unexpected part": (dict(image=JPEG, patient_name="Jane"), 422, "validation-error"),
    # PostgreSQL cannot store NUL in text: refused as input on every database, never a 500 at the insert.
    "NUL in client_reference": (dict(image=JPEG, client_reference="rx\x00123"), 422, "validation-error"),
    "escape in client_reference": (dict(image=JPEG, client_reference="rx\x1b[2J"), 422, "validation-error"),
}


@pytest.mark.parametrize("case", list(UPLOAD_CASES))
def test_bad_upload(bad_env: ApiEnv, case: str) -> None:
    fields, status, slug = UPLOAD_CASES[case]
    before = count_rows(bad_env.settings, Verification)
    response = post_verification(bad_env.client, bad_env.keys[Role.CLIENT], **fields)
    body = assert_problem(response, status, slug)
    if slug in ("unknown-ndc", "malformed-ndc", "product-not-in-model"):
        assert body["errors"][0]["field"] == "prescribed_ndc"
    assert count_rows(bad_env.settings, Verification) == before  # only verdicts are audit records
    assert_still_ready(bad_env)


RAW_CASES: dict[str, tuple[list[tuple[str, str | None, bytes]], int, str]] = {
    "missing image part": ([("prescribed_ndc", None, FAVOURITE.encode())], 422, "missing-part"),
    "missing prescribed_ndc part": ([("image", "bottle.jpg", JPEG)], 422, "missing-part"),
    "duplicate image part": ([("image", "a.jpg", JPEG), ("image", "b.jpg", JPEG),
                              ("prescribed_ndc", None, FAVOURITE.encode())], 422, "validation-error"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_bad_form(bad_env: ApiEnv, case: str) -> None:
    parts, status, slug = RAW_CASES[case]
    body, content_type = multipart(parts)
    response = bad_env.client.post("/v1/verifications", content=body,
                                   headers={**bad_env.as_role("client"), "Content-Type": content_type})
    problem = assert_problem(response, status, slug)
    if slug == "missing-part":
        assert problem["errors"][0]["code"] == "missing"
    assert_still_ready(bad_env)


def test_wrong_request_content_types(bad_env: ApiEnv) -> None:
    headers = bad_env.as_role("client")
    as_json = bad_env.client.post("/v1/verifications", json={"prescribed_ndc": FAVOURITE}, headers=headers)
    assert_problem(as_json, 415, "unsupported-media-type")
    as_urlencoded = bad_env.client.post("/v1/verifications", data={"prescribed_ndc": FAVOURITE}, headers=headers)
    assert_problem(as_urlencoded, 415, "unsupported-media-type")
    no_boundary = bad_env.client.post("/v1/verifications", content=b"x",
                                      headers={**headers, "Content-Type": "multipart/form-data"})
    assert_problem(no_boundary, 400, "malformed-multipart")
    body, content_type = multipart([("image", "b.jpg", JPEG)])
    cut = bad_env.client.post("/v1/verifications", content=body[:-30], headers={**headers, "Content-Type": content_type})
    assert_problem(cut, 400, "malformed-multipart")
    assert_still_ready(bad_env)


def test_the_part_content_type_is_ignored_the_bytes_decide(bad_env: ApiEnv) -> None:
    response = post_verification(bad_env.client, bad_env.keys[Role.CLIENT], image=JPEG, filename="photo.txt",
                                 content_type="text/plain")
    assert response.status_code == 200
    png = post_verification(bad_env.client, bad_env.keys[Role.CLIENT], image=image_bytes("PNG"), filename="x.png")
    webp = post_verification(bad_env.client, bad_env.keys[Role.CLIENT], image=image_bytes("WEBP"), filename="x")
    assert png.status_code == webp.status_code == 200


def test_an_oversized_stream_is_refused_without_content_length(bad_env: ApiEnv) -> None:
    body, content_type = multipart([("prescribed_ndc", None, FAVOURITE.encode()),
                                    ("image", "big.jpg", b"\xff\xd8\xff" + b"\0" * (3 * UPLOAD_LIMIT))])
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 16_384):
            sent.append(start)
            yield body[start:start + 16_384]

    response = bad_env.client.post("/v1/verifications", content=chunks(),
                                   headers={**bad_env.as_role("client"), "Content-Type": content_type})
    assert_problem(response, 413, "image-too-large")
    assert_still_ready(bad_env)


def test_a_declared_oversized_body_is_refused_up_front(bad_env: ApiEnv) -> None:
    body, content_type = multipart([("image", "big.jpg", b"\xff\xd8\xff" + b"\0" * (2 * UPLOAD_LIMIT))])
    response = bad_env.client.post("/v1/verifications", content=body,
                                   headers={**bad_env.as_role("client"), "Content-Type": content_type})
    problem = assert_problem(response, 413, "image-too-large")
    assert problem["limit_bytes"] == UPLOAD_LIMIT and response.headers["connection"] == "close"


def test_a_bad_idempotency_key_header(bad_env: ApiEnv) -> None:
    response = post_verification(bad_env.client, bad_env.keys[Role.CLIENT], image=JPEG,
                                 headers={"Idempotency-Key": "x" * 201})
    assert_problem(response, 422, "validation-error")


def test_rejections_are_counted_by_reason(bad_env: ApiEnv) -> None:
    post_verification(bad_env.client, bad_env.keys[Role.CLIENT], image=b"")
    text = bad_env.client.get("/metrics").text
    assert 'rxverify_verification_rejected_total{reason="image-empty"}' in text


def test_keys_and_roles(bad_env: ApiEnv) -> None:
    assert_problem(post_verification(bad_env.client, "rxv_nope", image=JPEG), 401, "invalid-api-key")
    client_headers = bad_env.as_role("client")
    for method, path in (("get", "/v1/verifications"), ("get", "/v1/verifications/abc"),
                         ("post", "/v1/verifications/abc/resolution")):
        response = bad_env.client.request(method.upper(), path, headers=client_headers,
                                          json={"actual_ndc": FAVOURITE} if method == "post" else None)
        assert_problem(response, 403, "forbidden")
    assert_still_ready(bad_env)
