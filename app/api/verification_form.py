"""The `multipart/form-data` body of POST /v1/verifications, parsed while it streams in.

Starlette's form parser spools the whole file before a route sees it. This reader counts the image
part's bytes as they arrive and refuses with 413 as soon as they pass `max_upload_bytes` (or at once,
from Content-Length), keeps the image in memory (no temp file), and refuses unknown, duplicate,
oversized or missing parts with problem types of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import DomainError, FieldError, InvalidInput
from app.inference.images import ImageTooLarge
from app.schemas.common import CONTROL_CHARACTER_MESSAGE, has_control_characters

IMAGE_FIELD = "image"
# The text parts and their longest accepted values (characters).
TEXT_FIELDS = {"prescribed_ndc": 64, "client_reference": 200}
REQUIRED_FIELDS = (IMAGE_FIELD, "prescribed_ndc")
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the text parts
MAX_PARTS = 8


class UnsupportedMediaType(DomainError):
    """The request body is not multipart/form-data (415)."""

    status = 415
    default_slug = "unsupported-media-type"
    default_title = "The request body must be multipart/form-data"


class MalformedMultipart(DomainError):
    """The multipart body cannot be parsed (400)."""

    status = 400
    default_slug = "malformed-multipart"
    default_title = "The multipart body is malformed"


class MissingPart(InvalidInput):
    """A required form part is absent (422)."""

    default_slug = "missing-part"
    default_title = "A required form part is missing"


@dataclass(frozen=True, slots=True)
class VerificationForm:
    """The parsed request: the image bytes and the text fields exactly as sent."""

    image: bytes
    prescribed_ndc: str
    client_reference: str | None = None
    image_filename: str | None = None


@dataclass
class _Part:
    name: str | None = None
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _FormCollector:
    """python-multipart callbacks that enforce the limits while bytes arrive."""

    def __init__(self, *, max_image_bytes: int) -> None:
        self.max_image_bytes = max_image_bytes
        self.parts: dict[str, _Part] = {}
        self.errors: list[FieldError] = []
        self.count = 0
        self.ended = False
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {"on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
                "on_header_field": self._header_field, "on_header_value": self._header_value_data,
                "on_header_end": self._header_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self.count += 1
        if self.count > MAX_PARTS:
            raise InvalidInput(f"the form has more than {MAX_PARTS} parts", slug="validation-error",
                               errors=[FieldError("body", "too many parts", "too_many_parts")])
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            _kind, options = parse_options_header(bytes(self._header_value))
            name, filename = options.get(b"name"), options.get(b"filename")
            self._part.name = name.decode("utf-8", "replace") if name is not None else None
            self._part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        self._header_name.clear()
        self._header_value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.data += data[start:end]
        if part.name == IMAGE_FIELD:
            if len(part.data) > self.max_image_bytes:
                raise ImageTooLarge(f"the image file has more than {self.max_image_bytes} bytes (the limit)",
                                    headers={"Connection": "close"}, extra={"limit_bytes": self.max_image_bytes})
        elif len(part.data) > TEXT_FIELDS.get(part.name or "", 0) * 4:  # UTF-8: at most 4 bytes a character
            self._too_long(part)

    def _too_long(self, part: _Part) -> None:
        limit = TEXT_FIELDS.get(part.name or "")
        if limit is None:
            raise InvalidInput(f"unexpected form part {part.name!r}", slug="validation-error",
                               errors=[FieldError(part.name or "body", "unexpected part", "unexpected_part")])
        raise InvalidInput(f"{part.name}: at most {limit} characters", slug="validation-error",
                           errors=[FieldError(part.name or "body", f"at most {limit} characters", "too_long")])

    def _part_end(self) -> None:
        part, name = self._part, self._part.name
        if name is None:
            self.errors.append(FieldError("body", "a part has no Content-Disposition name", "unnamed_part"))
        elif name != IMAGE_FIELD and name not in TEXT_FIELDS:
            self.errors.append(FieldError(name, "unexpected part", "unexpected_part"))
        elif name in self.parts:
            self.errors.append(FieldError(name, "sent more than once", "duplicate_part"))
        else:
            self.parts[name] = part
        self._part = _Part()

    def _end(self) -> None:
        self.ended = True


def _text(parts: dict[str, _Part], name: str, errors: list[FieldError]) -> str | None:
    part = parts.get(name)
    if part is None:
        return None
    try:
        value = bytes(part.data).decode("utf-8")  # kept exactly as sent (audit)
    except UnicodeDecodeError:
        errors.append(FieldError(name, "not valid UTF-8", "unicode"))
        return None
    if len(value) > TEXT_FIELDS[name]:
        errors.append(FieldError(name, f"at most {TEXT_FIELDS[name]} characters", "too_long"))
    elif has_control_characters(value):
        errors.append(FieldError(name, CONTROL_CHARACTER_MESSAGE, "control_character"))
    return value


async def read_verification_form(request: Request, *, max_image_bytes: int) -> VerificationForm:
    """Stream and parse the form; raise a problem (413, 415, 400 or 422) for anything unusable."""
    media_type, options = parse_options_header(request.headers.get("content-type"))
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1") or "none"
        raise UnsupportedMediaType(f"send the photo as multipart/form-data (parts `image`, `prescribed_ndc`, "
                                   f"optional `client_reference`); the request's content type is {shown}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedMultipart("the multipart/form-data content type has no boundary parameter")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_image_bytes + FORM_OVERHEAD_BYTES:
        raise ImageTooLarge(f"the request declares {declared} bytes; the image limit is {max_image_bytes}",
                            headers={"Connection": "close"}, extra={"limit_bytes": max_image_bytes})
    collector = _FormCollector(max_image_bytes=max_image_bytes)
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as error:
        raise MalformedMultipart(f"the multipart body cannot be parsed: {error}") from None
    if not collector.ended:
        raise MalformedMultipart("the multipart body ended before its closing boundary")
    errors = list(collector.errors)
    missing = [name for name in REQUIRED_FIELDS if name not in collector.parts]
    if missing:
        raise MissingPart(f"the form is missing the part{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                          errors=[FieldError(name, "required part is missing", "missing") for name in missing])
    prescribed = _text(collector.parts, "prescribed_ndc", errors)
    reference = _text(collector.parts, "client_reference", errors)
    if prescribed is not None and not prescribed.strip() and not errors:
        errors.append(FieldError("prescribed_ndc", "must not be empty", "empty"))
    if errors:
        summary = "; ".join(f"{e.field}: {e.message}" for e in errors[:3])
        raise InvalidInput(summary, slug="validation-error", title="Request validation failed", errors=errors)
    image = collector.parts[IMAGE_FIELD]
    assert prescribed is not None
    return VerificationForm(image=bytes(image.data), prescribed_ndc=prescribed, client_reference=reference if reference and reference.strip() else None,
                            image_filename=image.filename)
