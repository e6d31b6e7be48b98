"""Shared schema pieces: the problem document and strict request models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RequestModel(BaseModel):
    """Base of request bodies: unknown fields are an error. Numbers and booleans are declared strict
    (`Field(strict=True)`), so `"5"` or `"yes"` is a type error rather than silently coerced."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


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
