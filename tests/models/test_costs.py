"""Cost matrices: CSV round trip, validation, tempering, the Pareto generator."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.costs import CostMatrix, CostMatrixError, check_cost
from models.pmi import PMI_EXPERT_COSTS, PMI_NDCS

CLASSES = ("a", "b", "c")


def test_unlisted_pairs_default_to_one_off_diagonal() -> None:
    matrix = CostMatrix.from_pairs(CLASSES, {("a", "b"): 10})
    assert matrix.cost("a", "b") == 10
    assert matrix.cost("b", "a") == 1
    assert matrix.cost("c", "c") == 0


def test_pmi_expert_costs_orientation() -> None:
    matrix = CostMatrix.from_pairs(PMI_NDCS, PMI_EXPERT_COSTS)
    # Rows are the truth: trazodone in the bottle when glipizide was predicted costs 10.
    assert matrix.cost("50111-0434", "00591-0461") == 10
    assert matrix.cost("00591-0461", "50111-0434") == 1
    assert matrix.cost("68382-0227", "53489-0156") == 8
    assert len(matrix.critical_pairs(5)) == 4


def test_csv_round_trip_both_headers() -> None:
    matrix = CostMatrix.from_pairs(CLASSES, {("a", "b"): 10, ("c", "a"): 2.5, ("b", "c"): 0})
    text = matrix.to_csv()
    assert text.splitlines()[0] == "true,predicted,cost"
    assert CostMatrix.read_csv(io.StringIO(text), CLASSES) == matrix
    app_text = matrix.to_csv(header=("true_ndc", "predicted_ndc", "cost"))
    assert CostMatrix.read_csv(io.StringIO(app_text), CLASSES) == matrix


def test_a_csv_saved_by_excel_reads_despite_its_byte_order_mark(tmp_path: Path) -> None:
    matrix = CostMatrix.from_pairs(CLASSES, {("a", "b"): 10})
    path = tmp_path / "costs.csv"
    path.write_bytes(b"\xef\xbb\xbf" + matrix.to_csv().replace("\n", "\r\n").encode())
    assert CostMatrix.read_csv(path, CLASSES) == matrix
    assert CostMatrix.read_csv(io.StringIO("\ufeff" + matrix.to_csv()), CLASSES) == matrix
    quoted = '\ufeff"true","predicted","cost"\r\n"a","b","10"\r\n'  # PowerShell's Export-Csv quotes every field
    assert CostMatrix.read_csv(io.StringIO(quoted), CLASSES) == matrix


@pytest.mark.parametrize(
    ("body", "row", "fragment"),
    [
        ("true,predicted,cost\na,b,-1\n", 2, "negative"),
        ("true,predicted,cost\na,b,nan\n", 2, "finite"),
        ("true,predicted,cost\na,b,inf\n", 2, "finite"),
        ("true,predicted,cost\na,a,3\n", 2, "diagonal"),
        ("true,predicted,cost\na,zz,3\n", 2, "unknown"),
        ("true,predicted,cost\na,b,1\na,b,2\n", 3, "twice"),
        ("true,predicted,cost\na,b,x\n", 2, "not a number"),
        # float() reads each of these as a number; a cost cell must be a plain ASCII decimal.
        ("true,predicted,cost\na,b,1_0\n", 2, "not a number"),
        ("true,predicted,cost\na,b,\u0665\n", 2, "not a number"),
        ("true,predicted,cost\na,b,\uff17\n", 2, "not a number"),
        ("x,y,z\na,b,1\n", 1, "header"),
        ("true,predicted,cost\na,c,1\na,b,1,9\n", 3, "4 fields where the header has 3"),
        ('true,predicted,cost\n"' + "a" * 200_000 + '",b,1\n', 2, "not readable as CSV"),
    ],
)
def test_csv_rejects_bad_cells_and_names_them(body: str, row: int, fragment: str) -> None:
    with pytest.raises(CostMatrixError) as caught:
        CostMatrix.read_csv(io.StringIO(body), CLASSES)
    assert caught.value.row == row
    assert fragment in str(caught.value)


def test_negative_zero_is_stored_as_zero() -> None:
    # -0.0 == 0.0, but it prints (and hashes) differently: two equal matrices must serialise the same.
    matrix = CostMatrix.read_csv(io.StringIO("true,predicted,cost\na,b,-0.0\n"), CLASSES)
    assert math.copysign(1.0, float(matrix.matrix[0, 1])) == 1.0 and "-0" not in matrix.to_csv(only_non_default=False)


def test_max_cost_is_enforced() -> None:
    with pytest.raises(CostMatrixError, match="maximum"):
        check_cost("a", "b", 1e9, max_cost=1000)


def test_matrix_is_immutable_and_validated() -> None:
    matrix = CostMatrix.uniform(CLASSES)
    with pytest.raises(ValueError):
        matrix.matrix[0, 1] = 5
    with pytest.raises(CostMatrixError):
        CostMatrix(CLASSES, np.array([[1.0, 1, 1], [1, 0, 1], [1, 1, 0]]))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tau=st.floats(0.5, 4.0))
def test_tempered_is_a_distribution_over_off_diagonal_pairs(seed: int, tau: float) -> None:
    matrix = CostMatrix.pareto(list("abcd"), seed=seed)
    probs = matrix.tempered(tau)
    assert math.isclose(probs.sum(), 1.0, rel_tol=1e-9)
    assert np.all(np.diag(probs) == 0)
    assert np.all(probs >= 0)
    # Tempering keeps the order of costs.
    flat_cost, flat_prob = matrix.matrix.ravel(), probs.ravel()
    order = np.argsort(flat_cost)
    assert np.all(np.diff(flat_prob[order]) >= -1e-15)


def test_tempered_does_not_overflow_on_large_costs_or_tau() -> None:
    # 1e110^3 overflows a float; c~ only depends on the cost ratios, so it must still be exact.
    matrix = CostMatrix(CLASSES, np.array([[0.0, 1e110, 2e110], [1e110, 0, 1e110], [1e110, 1e110, 0]]))
    probs = matrix.tempered(3.0)
    assert np.all(np.isfinite(probs)) and math.isclose(probs.sum(), 1.0, rel_tol=1e-12)
    assert math.isclose(probs[0, 2] / probs[0, 1], 8.0, rel_tol=1e-12)
    assert np.allclose(matrix.tempered(3.0), CostMatrix(CLASSES, matrix.matrix / 1e110).tempered(3.0), rtol=1e-12)


def test_pareto_is_seeded_and_at_least_one() -> None:
    first = CostMatrix.pareto(list("abcde"), seed=7)
    assert first == CostMatrix.pareto(list("abcde"), seed=7)
    assert first != CostMatrix.pareto(list("abcde"), seed=8)
    off = first.matrix[~np.eye(5, dtype=bool)]
    assert off.min() >= 1.0


def test_single_pair_and_reindex() -> None:
    matrix = CostMatrix.single_pair(CLASSES, "a", "c")
    assert matrix.matrix.sum() == 1
    reordered = matrix.reindexed(("c", "b", "a"))
    assert reordered.cost("a", "c") == 1
    assert reordered.cost("b", "a") == 0
    assert matrix.fingerprint() != reordered.fingerprint()


def test_read_csv_resolves_names_through_the_given_function() -> None:
    aliases = {"alpha": "A", "A": "A", "bee": "B", "B": "B", "C": "C"}

    def resolve(name: str) -> str:
        if name not in aliases:
            raise ValueError("no such product")
        return aliases[name]

    matrix = CostMatrix.read_csv(["true,predicted,cost", "alpha,bee,7", "C,A,2"], ("A", "B", "C"), resolve=resolve)
    assert matrix.cost("A", "B") == 7.0 and matrix.cost("C", "A") == 2.0
    with pytest.raises(CostMatrixError, match="no such product") as caught:
        CostMatrix.read_csv(["true,predicted,cost", "alpha,bee,7", "dee,A,2"], ("A", "B", "C"), resolve=resolve)
    assert caught.value.row == 3
    with pytest.raises(CostMatrixError, match="listed twice"):
        CostMatrix.read_csv(["true,predicted,cost", "alpha,bee,7", "A,B,2"], ("A", "B", "C"), resolve=resolve)
