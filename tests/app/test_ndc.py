"""NDC parsing: every form in PRODUCT.md, the 12-digit format, bare codes resolved against the catalog."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from app.ndc import (
    AmbiguousNdc,
    MalformedNdc,
    NdcError,
    NdcForm,
    UnknownNdc,
    is_product_key,
    normalize_ndc,
    parse_ndc,
    readings,
    resolve_ndc,
)


def _digits(n: int) -> st.SearchStrategy[str]:
    return st.text(alphabet="0123456789", min_size=n, max_size=n)


@pytest.mark.parametrize(("text", "form", "key", "package"), [
    ("0378-0208-01", NdcForm.PACKAGE_4_4_2, "00378-0208", "00378-0208-01"),
    ("00378-208-01", NdcForm.PACKAGE_5_3_2, "00378-0208", "00378-0208-01"),
    ("00378-0208-1", NdcForm.PACKAGE_5_4_1, "00378-0208", "00378-0208-01"),
    ("00378-0208-01", NdcForm.PACKAGE_5_4_2, "00378-0208", "00378-0208-01"),
    ("00378020801", NdcForm.PACKAGE_5_4_2, "00378-0208", "00378-0208-01"),
    ("000378-0208-01", NdcForm.PACKAGE_6_4_2, "00378-0208", "00378-0208-01"),
    ("000378020801", NdcForm.PACKAGE_6_4_2, "00378-0208", "00378-0208-01"),
    ("123456-7890-12", NdcForm.PACKAGE_6_4_2, "123456-7890", "123456-7890-12"),
    ("00378-0208", NdcForm.PRODUCT_5_4, "00378-0208", None),
    ("003780208", NdcForm.PRODUCT_5_4, "00378-0208", None),
    ("0378-0208", NdcForm.PRODUCT_4_4, "00378-0208", None),
    ("00378-208", NdcForm.PRODUCT_5_3, "00378-0208", None),
    ("123456-7890", NdcForm.PRODUCT_6_4, "123456-7890", None),
    (" 50111-0434 ", NdcForm.PRODUCT_5_4, "50111-0434", None),
])
def test_examples(text: str, form: NdcForm, key: str, package: str | None) -> None:
    parsed = parse_ndc(text)
    assert (parsed.form, parsed.product_key, parsed.package_ndc) == (form, key, package)
    assert parsed.input == text  # verbatim, whitespace included
    assert normalize_ndc(text) == key


def test_twelve_digit_format_keeps_a_new_six_digit_labeler() -> None:
    legacy, new = parse_ndc("000378-0208-01"), parse_ndc("100378-0208-01")
    assert legacy.product_key == "00378-0208" and legacy.package_ndc_12 == "000378-0208-01"
    assert new.product_key == "100378-0208" and len(new.product_key) == 11
    assert parse_ndc("00378-0208-01").package_ndc_12 == "000378-0208-01"


@pytest.mark.parametrize("text", ["", "abc", "0378-0208-0", "00378-02080-1", "0378_0208_01", "1234567",
                                  "1234567890123", "00378--0208", "-00378-0208", "0378-0208-01-1",
                                  "٠٠٣٧٨-٠٢٠٨-٠١", "00378-0208-0a", "0378 0208 01", "0378–0208–01"])
def test_malformed(text: str) -> None:
    with pytest.raises(MalformedNdc):
        parse_ndc(text)


def test_bare_ten_digits_is_never_guessed() -> None:
    with pytest.raises(AmbiguousNdc) as caught:
        parse_ndc("0378020801")
    assert "00378-0208" in caught.value.candidates and len(caught.value.candidates) == 4


def test_bare_ten_digits_resolved_against_the_catalog() -> None:
    catalog = {"00378-0208", "50111-0434"}
    assert resolve_ndc("0378020801", catalog).product_key == "00378-0208"
    assert resolve_ndc("0378020801", catalog).form is NdcForm.PACKAGE_4_4_2
    with pytest.raises(UnknownNdc):
        resolve_ndc("9999999999", catalog)
    # 4-4-2 reads 00378-0208 and 5-3-2 reads 03780-0208: both known, so it stays ambiguous.
    with pytest.raises(AmbiguousNdc) as caught:
        resolve_ndc("0378020801", catalog | {"03780-0208"})
    assert set(caught.value.candidates) == {"00378-0208", "03780-0208"}


def test_unambiguous_forms_checked_against_the_catalog() -> None:
    assert resolve_ndc("0378-0208-01", {"00378-0208"}).product_key == "00378-0208"
    with pytest.raises(UnknownNdc):
        resolve_ndc("0378-0208-01", {"50111-0434"})


def test_is_product_key() -> None:
    assert is_product_key("00378-0208") and is_product_key("123456-7890")
    assert not is_product_key("0378-0208") and not is_product_key("00378-0208-01")
    assert not is_product_key("000378-0208") and not is_product_key("junk")


# --- properties -----------------------------------------------------------------------------------
@given(labeler=_digits(5), product=_digits(4), package=_digits(2))
def test_every_spelling_of_a_package_gives_the_same_key(labeler: str, product: str, package: str) -> None:
    key = f"{labeler}-{product}"
    spellings = [f"{labeler}-{product}-{package}", f"{labeler}{product}{package}",
                 f"0{labeler}-{product}-{package}", f"0{labeler}{product}{package}", key, f"{labeler}{product}"]
    if labeler.startswith("0"):
        spellings.append(f"{labeler[1:]}-{product}-{package}")
    if product.startswith("0"):
        spellings.append(f"{labeler}-{product[1:]}-{package}")
    if package.startswith("0"):
        spellings.append(f"{labeler}-{product}-{package[1:]}")
    for spelling in spellings:
        assert normalize_ndc(spelling) == key, spelling
        assert parse_ndc(spelling).input == spelling


@given(labeler=_digits(5), product=_digits(4), package=_digits(2))
def test_package_code_round_trips(labeler: str, product: str, package: str) -> None:
    parsed = parse_ndc(f"{labeler}-{product}-{package}")
    assert parse_ndc(parsed.package_ndc or "").product_key == parsed.product_key
    assert parse_ndc(parsed.package_ndc_12 or "").product_key == parsed.product_key


@given(st.text(max_size=20))
def test_any_string_parses_or_raises_an_ndc_error(text: str) -> None:
    try:
        key = normalize_ndc(text)
    except NdcError:
        return
    assert normalize_ndc(key) == key  # idempotent
    assert is_product_key(key)


@given(bare=_digits(10))
def test_bare_ten_digits_resolve_only_with_exactly_one_catalog_match(bare: str) -> None:
    keys = {r.product_key for r in readings(bare)}
    assume(len(keys) > 1)
    with pytest.raises(AmbiguousNdc):
        parse_ndc(bare)
    for key in keys:
        assert resolve_ndc(bare, {key, "99999-9999"} - (keys - {key})).product_key == key
    with pytest.raises(AmbiguousNdc):
        resolve_ndc(bare, keys)
    with pytest.raises(UnknownNdc):
        resolve_ndc(bare, set())


@given(labeler=_digits(4), product=_digits(4), package=_digits(2))
def test_four_four_two_pads_the_labeler(labeler: str, product: str, package: str) -> None:
    parsed = parse_ndc(f"{labeler}-{product}-{package}")
    assert parsed.form is NdcForm.PACKAGE_4_4_2
    assert parsed.product_key == f"0{labeler}-{product}"
