"""The PMI dataset's 20 products (paper, Table 8) and its expert cost matrix (Table 6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PmiProduct:
    """One PMI product: its product NDC key and the physical features pharmacists look at."""

    ndc: str
    name: str
    shape: str
    colour: str
    imprint: tuple[str, ...]
    size_mm: float
    train_size: int
    valid_size: int
    test_size: int


# Verbatim from the paper's Table 8 (imprint sides separated by ";" there).
PMI_PRODUCTS: tuple[PmiProduct, ...] = (
    PmiProduct('00378-0208', 'Furosemide 20 MG Oral Tablet', 'Round', 'White', ('M2',), 6.0, 602, 199, 200),
    PmiProduct('00378-3855', 'Escitalopram 5 MG Oral Tablet', 'Round', 'White', ('M', 'EC5'), 6.0, 129, 42, 42),
    PmiProduct('00591-0461', 'Glipizide 10 MG Oral Tablet', 'Round', 'White', ('Watson', '461'), 10.0, 148, 48, 48),
    PmiProduct('16729-0020', 'pioglitazone 15 MG Oral Tablet', 'Round', 'White', ('P', '15'), 5.0, 258, 84, 85),
    PmiProduct('16729-0168', 'Escitalopram 5 MG Oral Tablet', 'Round', 'White', ('5',), 5.0, 129, 42, 42),
    PmiProduct('50111-0434', 'Trazodone Hydrochloride 100 MG Oral Tablet', 'Round', 'White', ('PLIVA', '434'), 11.0, 601, 199, 200),
    PmiProduct('53489-0156', 'Allopurinol 100 MG Oral Tablet', 'Round', 'White', ('MP', '71'), 10.0, 600, 200, 200),
    PmiProduct('53746-0544', 'Primidone 50 MG Oral Tablet', 'Round', 'White', ('AN', '44'), 6.0, 97, 31, 32),
    PmiProduct('57664-0377', 'tramadol hydrochloride 50 MG Oral Tablet', 'Capsule', 'White', ('377',), 13.0, 601, 199, 200),
    PmiProduct('62037-0831', '24 HR metoprolol succinate 50 MG Extended', 'Round', 'White', ('831',), 9.0, 600, 200, 200),
    PmiProduct('62037-0832', '24 HR metoprolol succinate 100 MG Extended', 'Round', 'White', ('832',), 10.0, 601, 200, 200),
    PmiProduct('64380-0803', 'Ranitidine 150 MG Oral Tablet (Strides Pharma', 'Round', 'Brown', ('S', '429'), 10.0, 548, 181, 182),
    PmiProduct('65162-0253', 'Ranitidine 150 MG Oral Tablet (Amneal Pharmaceuticals', 'Round', 'Orange', ('IP', '253'), 9.0, 557, 184, 185),
    PmiProduct('67253-0901', 'Alprazolam 0.5 MG Oral Tablet', 'Oval', 'Yellow', ('S901',), 9.0, 497, 164, 165),
    PmiProduct('68382-0008', 'lamotrigine 100 MG Oral Tablet', 'Round', 'White', ('ZC', '80'), 10.0, 423, 139, 140),
    PmiProduct('68382-0227', 'Amiodarone hydrochloride 200 MG Oral Tablet', 'Round', 'White', ('ZE', '65'), 10.0, 120, 39, 39),
    PmiProduct('69097-0127', 'Amlodipine 5 MG Oral Tablet', 'Round', 'White', ('127', 'C'), 8.0, 600, 200, 200),
    PmiProduct('69097-0128', 'Amlodipine 10 MG Oral Tablet', 'Round', 'White', ('128', 'C'), 8.0, 600, 200, 200),
    PmiProduct('69315-0904', 'Lorazepam 0.5 MG Oral Tablet', 'Round', 'White', ('EP', '904'), 5.0, 357, 118, 118),
    PmiProduct('69315-0905', 'Lorazepam 1 MG Oral Tablet', 'Round', 'White', ('EP', '905', '1'), 7.0, 325, 107, 108),
)

PMI_NDCS: tuple[str, ...] = tuple(p.ndc for p in PMI_PRODUCTS)

# (true NDC, predicted NDC) -> cost; every other off-diagonal pair costs 1 (PRODUCT.md, paper Table 6).
PMI_EXPERT_COSTS: dict[tuple[str, str], float] = {
    ("50111-0434", "00591-0461"): 10.0,
    ("53489-0156", "68382-0227"): 10.0,
    ("68382-0227", "53489-0156"): 8.0,
    ("53746-0544", "00378-0208"): 10.0,
}


def pmi_product(ndc: str) -> PmiProduct:
    """Return the PMI product with this product NDC key."""
    for product in PMI_PRODUCTS:
        if product.ndc == ndc:
            return product
    raise KeyError(ndc)
