"""The product catalog: one row per product NDC key (the classifier's classes)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, Float, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.orm.types import UTCDateTime, utcnow

NDC_KEY_LENGTH = 16  # "LLLLL-PPPP" (10) or a 12-digit-era "LLLLLL-PPPP" (11), with room to spare


class Product(Base):
    """A dispensable product, keyed by its normalised product NDC (see app.ndc)."""

    __tablename__ = "products"

    ndc: Mapped[str] = mapped_column(String(NDC_KEY_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    shape: Mapped[str] = mapped_column(String(40))
    colour: Mapped[str] = mapped_column(String(40))
    # One string per tablet side, as in the paper's Table 8 ("M;EC5" -> ["M", "EC5"]).
    imprint: Mapped[list[str]] = mapped_column(JSON, default=list)
    size_mm: Mapped[float | None] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
