"""Product catalog schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from app.schemas.common import ReadModel, RequestModel

NdcText = Field(min_length=1, max_length=32, examples=["00378-0208", "0378-0208-01"])
# One side's imprint (Table 8's longest is "PLIVA 434"): bounded, as every stored and echoed text is.
ImprintSide = Annotated[str, Field(min_length=1, max_length=40)]


class ProductCreate(RequestModel):
    """A new product; `ndc` may be any NDC form and is stored as the padded product key."""

    ndc: str = NdcText
    name: str = Field(min_length=1, max_length=200)
    shape: str = Field(min_length=1, max_length=40)
    colour: str = Field(min_length=1, max_length=40)
    imprint: list[ImprintSide] = Field(default_factory=list, max_length=10, description="One string per side.")
    size_mm: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False, strict=True)
    active: bool = Field(default=True, strict=True)
    reason: str | None = Field(default=None, max_length=2000)


_NOT_NULLABLE = ("name", "shape", "colour", "imprint", "active")


def _omit_null_from_schema(schema: dict[str, Any]) -> None:
    """In the OpenAPI schema, the fields that may be left out but not sent as null are not nullable."""
    for name in _NOT_NULLABLE:
        schema["properties"][name].pop("default", None)
        variants = schema["properties"][name].pop("anyOf", None)
        if variants:
            schema["properties"][name].update(next(v for v in variants if v.get("type") != "null"))


class ProductUpdate(RequestModel):
    """Fields to change; omitted fields stay as they are. `active: false` withdraws a product."""

    model_config = ConfigDict(json_schema_extra=_omit_null_from_schema)

    name: str | None = Field(default=None, min_length=1, max_length=200)
    shape: str | None = Field(default=None, min_length=1, max_length=40)
    colour: str | None = Field(default=None, min_length=1, max_length=40)
    imprint: list[ImprintSide] | None = Field(default=None, max_length=10)
    size_mm: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False, strict=True)
    active: bool | None = Field(default=None, strict=True)
    reason: str | None = Field(default=None, max_length=2000)

    @field_validator(*_NOT_NULLABLE)
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        # Runs only for fields sent (defaults are not validated): an explicit null is refused at its field.
        if value is None:
            raise ValueError(f"{info.field_name} may be left out but cannot be null")
        return value

    def changes(self) -> dict[str, Any]:
        """The fields the caller set, without the audit reason."""
        return {k: v for k, v in self.model_dump(exclude_unset=True).items() if k != "reason"}


class ProductRead(ReadModel):
    """A catalog product."""

    ndc: str
    name: str
    shape: str
    colour: str
    imprint: list[str]
    size_mm: float | None
    active: bool
    created_at: datetime
    updated_at: datetime
