"""Shared schema pieces: the problem document and strict request models."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

# Row ids are 32-bit integers in the database (SERIAL / INTEGER): a larger number cannot name a row,
# and PostgreSQL would refuse to compare with it ("integer out of range"), so it is a 422 up front.
MAX_ID = 2**31 - 1
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
IdQuery = Annotated[int | None, Query(ge=1, le=MAX_ID)]

# C0 control characters other than tab, line feed and carriage return. NUL cannot be stored in a
# PostgreSQL text column at all, and the others have no place in a name, a reason or a note.
_CONTROL_CLASS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f"
_CONTROL = re.compile(f"[{_CONTROL_CLASS}]")
# The same rule as a whole-string pattern, for Query(pattern=...) and Path(pattern=...).
NO_CONTROL_PATTERN = f"^[^{_CONTROL_CLASS}]*$"
CONTROL_CHARACTER_MESSAGE = "must not contain control characters (NUL, ESC, ...)"


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a character that free text must not (see _CONTROL)."""
    return _CONTROL.search(text) is not None


def _check_text(value: Any) -> None:
    if isinstance(value, str):
        if has_control_characters(value):
            raise ValueError(CONTROL_CHARACTER_MESSAGE)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_text(item)


class RequestModel(BaseModel):
    """Base of request bodies: unknown fields are an error. Numbers and booleans are declared strict
    (`Field(strict=True)`), so `"5"` or `"yes"` is a type error rather than silently coerced. No string
    field may hold control characters (422), whatever the model declares."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        _check_text(value)
        return value


class ReadModel(BaseModel):
    """Base of responses built from ORM rows."""

    model_config = ConfigDict(from_attributes=True)


class FieldErrorRead(BaseModel):
    """One bad input and where it is."""

    field: str = Field(examples=["changes[2].cost"])
    message: str
    code: str


class Problem(BaseModel):
    """An RFC 9457 problem document (media type application/problem+json)."""

    type: str = Field(examples=["https://rxverify.dev/problems/stale-parent"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldErrorRead] | None = None

    model_config = ConfigDict(extra="allow")


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting problem+json answers."""
    return {status: {"model": Problem, "content": {"application/problem+json": {}}} for status in statuses}
