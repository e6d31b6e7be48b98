"""NDC parsing and normalisation (pure functions): every package form maps to the product key.

The classifier's classes are *product* keys, labeler plus product, zero-padded to 5-4 (`00378-0208`).
Pharmacy software sends *package* NDCs in several forms; this module reads them all:

=================  ===================  ===============================================
form               example              product key
=================  ===================  ===============================================
4-4-2              ``0378-0208-01``     ``00378-0208`` (labeler padded)
5-3-2              ``00378-208-01``     ``00378-0208`` (product padded)
5-4-1              ``00378-0208-1``     ``00378-0208`` (package padded to 01)
5-4-2              ``00378-0208-01``    ``00378-0208`` (the 11-digit billing form)
11 digits          ``00378020801``      ``00378-0208`` (read as 5-4-2)
6-4-2              ``000378-0208-01``   ``00378-0208`` (see below)
12 digits          ``000378020801``     ``00378-0208`` (read as 6-4-2)
5-4 / 9 digits     ``00378-0208``       ``00378-0208`` (already a product key)
4-4, 5-3           ``0378-0208``        ``00378-0208`` (unpadded product keys)
6-4                ``100378-0208``      ``100378-0208``
=================  ===================  ===============================================

The 12-digit 6-4-2 format (FDA, from 2033) converts every existing code by padding its labeler with a
leading zero, so a 6-digit labeler that starts with 0 is a legacy 5-digit labeler and keeps its 5-4
key. A 6-digit labeler that starts with 1-9 has no 5-4 form: its product key is kept as 6-4
(`LLLLLL-PPPP`, 11 characters). The two shapes can never collide, because a key's length says which
it is, and `product_key` is the only spelling of a product anywhere in rxverify.

A bare 10-digit code (and a bare 8-digit product code) has no hyphens, so its split is ambiguous
(10 digits: 4-4-2, 5-3-2, 5-4-1 or a 6-4 product key). `parse_ndc` refuses it; `resolve_ndc`
checks every reading against the catalog and accepts it only when exactly one reading is a known
product. The caller's string is always kept verbatim in `ParsedNdc.input`.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar


class NdcForm(StrEnum):
    """The segment layout an NDC was read in."""

    PACKAGE_4_4_2 = "4-4-2"
    PACKAGE_5_3_2 = "5-3-2"
    PACKAGE_5_4_1 = "5-4-1"
    PACKAGE_5_4_2 = "5-4-2"
    PACKAGE_6_4_2 = "6-4-2"
    PRODUCT_4_4 = "4-4"
    PRODUCT_5_3 = "5-3"
    PRODUCT_5_4 = "5-4"
    PRODUCT_6_4 = "6-4"


class NdcError(ValueError):
    """An NDC that cannot be turned into one catalog product key; `slug` names the problem type."""

    slug: ClassVar[str] = "invalid-ndc"

    def __init__(self, message: str, *, ndc: str, candidates: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.ndc = ndc
        self.candidates = candidates


class MalformedNdc(NdcError):
    """The string is not an NDC in any accepted form."""

    slug = "malformed-ndc"


class AmbiguousNdc(NdcError):
    """The string has several readings (bare 10 or 8 digits) and the catalog does not settle it."""

    slug = "ambiguous-ndc"


class UnknownNdc(NdcError):
    """A well-formed NDC whose product is not in the catalog."""

    slug = "unknown-ndc"


@dataclass(frozen=True, slots=True)
class ParsedNdc:
    """One reading of an NDC string, normalised; `input` is the caller's string, untouched."""

    input: str
    form: NdcForm
    hyphenated: bool
    labeler: str  # 5 digits, or 6 for a 12-digit-era labeler that has no 5-digit form
    product: str  # 4 digits
    package: str | None  # 2 digits; None when the input was a product key

    @property
    def product_key(self) -> str:
        """The catalog key: `LLLLL-PPPP` (or `LLLLLL-PPPP` for a new 6-digit labeler)."""
        return f"{self.labeler}-{self.product}"

    @property
    def package_ndc(self) -> str | None:
        """The padded package code: 11-digit `LLLLL-PPPP-KK` (or `LLLLLL-PPPP-KK`); None for a product key."""
        return None if self.package is None else f"{self.labeler}-{self.product}-{self.package}"

    @property
    def package_ndc_12(self) -> str | None:
        """The package code in the 12-digit 6-4-2 format; None for a product key."""
        return None if self.package is None else f"{self.labeler.zfill(6)}-{self.product}-{self.package}"


# Hyphenated forms: (labeler, product, package) segment lengths -> form. Lengths decide the form alone.
_HYPHENATED: dict[tuple[int, ...], NdcForm] = {
    (4, 4, 2): NdcForm.PACKAGE_4_4_2,
    (5, 3, 2): NdcForm.PACKAGE_5_3_2,
    (5, 4, 1): NdcForm.PACKAGE_5_4_1,
    (5, 4, 2): NdcForm.PACKAGE_5_4_2,
    (6, 4, 2): NdcForm.PACKAGE_6_4_2,
    (4, 4): NdcForm.PRODUCT_4_4,
    (5, 3): NdcForm.PRODUCT_5_3,
    (5, 4): NdcForm.PRODUCT_5_4,
    (6, 4): NdcForm.PRODUCT_6_4,
}
# Bare digit strings: length -> every segment layout it could be. One entry = unambiguous.
_BARE: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((4, 4), (5, 3)),
    9: ((5, 4),),
    10: ((4, 4, 2), (5, 3, 2), (5, 4, 1), (6, 4)),
    11: ((5, 4, 2),),
    12: ((6, 4, 2),),
}
# ASCII digits only: str.isdigit() and \d also accept other scripts' digits.
_SEGMENT = re.compile(r"[0-9]+")


def _build(text: str, segments: list[str], *, hyphenated: bool) -> ParsedNdc:
    form = _HYPHENATED[tuple(len(s) for s in segments)]
    labeler, product = segments[0], segments[1].zfill(4)
    if len(labeler) == 6 and labeler.startswith("0"):
        labeler = labeler[1:]  # a legacy labeler converted to the 12-digit format
    elif len(labeler) == 4:
        labeler = labeler.zfill(5)
    package = segments[2].zfill(2) if len(segments) == 3 else None
    return ParsedNdc(input=text, form=form, hyphenated=hyphenated, labeler=labeler, product=product,
                     package=package)


def readings(text: str) -> tuple[ParsedNdc, ...]:
    """Every way `text` can be read as an NDC (one for all forms except bare 8- and 10-digit strings)."""
    if not isinstance(text, str):
        raise MalformedNdc(f"an NDC must be a string, not {type(text).__name__}", ndc=repr(text))
    stripped = text.strip()
    if "-" in stripped:
        segments = stripped.split("-")
        lengths = tuple(len(s) for s in segments)
        if lengths in _HYPHENATED and all(_SEGMENT.fullmatch(s) for s in segments):
            return (_build(text, segments, hyphenated=True),)
        raise MalformedNdc(
            f"{text!r} is not an NDC: hyphenated NDCs are 4-4-2, 5-3-2, 5-4-1, 5-4-2 or 6-4-2 digits "
            "(or a product key 5-4, 4-4, 5-3 or 6-4)", ndc=text)
    if _SEGMENT.fullmatch(stripped) and len(stripped) in _BARE:
        found: list[ParsedNdc] = []
        for layout in _BARE[len(stripped)]:
            cuts = [sum(layout[:i]) for i in range(len(layout) + 1)]
            segments = [stripped[cuts[i]:cuts[i + 1]] for i in range(len(layout))]
            found.append(_build(text, segments, hyphenated=False))
        return tuple(found)
    raise MalformedNdc(f"{text!r} is not an NDC: expected 8 to 12 digits, optionally hyphenated", ndc=text)


def _distinct_keys(found: tuple[ParsedNdc, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.product_key for r in found))


def parse_ndc(text: str) -> ParsedNdc:
    """Parse an NDC whose form is unambiguous; bare 10- and 8-digit strings raise AmbiguousNdc."""
    found = readings(text)
    keys = _distinct_keys(found)
    if len(keys) > 1:
        raise AmbiguousNdc(
            f"{text!r} has no hyphens, so its split is ambiguous (could be {', '.join(keys)}); "
            "send it hyphenated or in the 11-digit form", ndc=text, candidates=keys)
    return found[0]


def normalize_ndc(text: str) -> str:
    """The product key of an unambiguous NDC (e.g. `0378-0208-01` -> `00378-0208`)."""
    return parse_ndc(text).product_key


def resolve_ndc(text: str, catalog: Container[str]) -> ParsedNdc:
    """Parse `text` and check it against the catalog's product keys; bare codes need exactly one match."""
    found = readings(text)
    keys = _distinct_keys(found)
    matching = [r for r in found if r.product_key in catalog]
    matching_keys = _distinct_keys(tuple(matching))
    if len(matching_keys) == 1:
        return matching[0]
    if not matching_keys:
        if len(keys) == 1:
            raise UnknownNdc(f"NDC {text!r} (product {keys[0]}) is not in the catalog", ndc=text,
                             candidates=keys)
        raise UnknownNdc(f"none of the readings of {text!r} ({', '.join(keys)}) is in the catalog",
                         ndc=text, candidates=keys)
    raise AmbiguousNdc(f"{text!r} matches several catalog products ({', '.join(matching_keys)}); "
                       "send it hyphenated or in the 11-digit form", ndc=text, candidates=matching_keys)


def is_product_key(text: str) -> bool:
    """True when `text` is already a canonical product key (`LLLLL-PPPP`, or `LLLLLL-PPPP` not starting 0)."""
    try:
        parsed = parse_ndc(text)
    except NdcError:
        return False
    return parsed.package is None and parsed.product_key == text
