"""Cost matrices: c(y, z) is the cost of predicting z when the truth is y (rows true, columns predicted)."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_OFF_DIAGONAL_COST = 1.0
# Header names accepted when reading a long-form CSV; the first of each pair is what we write.
_TRUE_COLUMNS = ("true", "true_ndc")
_PREDICTED_COLUMNS = ("predicted", "predicted_ndc")
_EXTRA_FIELDS = "\x00extra"  # DictReader's key for the fields beyond the header (no header can hold NUL)


# An ASCII decimal, or a spelling of inf/nan (let through so that the error says "not finite").
_DECIMAL = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)


class CostMatrixError(ValueError):
    """A cost matrix or one of its cells is invalid; `true`/`predicted` name the bad cell when there is one."""

    def __init__(self, message: str, *, true: str | None = None, predicted: str | None = None,
                 row: int | None = None) -> None:
        super().__init__(message)
        self.true = true
        self.predicted = predicted
        self.row = row


def check_cost(true: str, predicted: str, cost: float | str, *, max_cost: float = math.inf,
               row: int | None = None) -> float:
    """Validate one cell and return it as a float: finite, >= 0, <= max_cost, and 0 on the diagonal.

    Text (a CSV cell) must be a plain ASCII decimal such as `10`, `2.5` or `1e3`: Python's float() would also
    read `1_0` as 10 and Arabic-Indic or full-width digits, and a typo must not become a safety cost.
    """
    if isinstance(cost, str) and not _DECIMAL.fullmatch(cost.strip()):
        raise CostMatrixError(f"cost {cost[:40]!r} is not a number", true=true, predicted=predicted, row=row)
    try:
        value = float(cost)
    except (TypeError, ValueError):
        raise CostMatrixError(f"cost {cost!r} is not a number", true=true, predicted=predicted, row=row) from None
    if not math.isfinite(value):
        raise CostMatrixError(f"cost {cost!r} is not finite", true=true, predicted=predicted, row=row)
    if value < 0:
        raise CostMatrixError(f"cost {value} is negative", true=true, predicted=predicted, row=row)
    if value > max_cost:
        raise CostMatrixError(f"cost {value} exceeds the maximum {max_cost}", true=true, predicted=predicted,
                              row=row)
    if true == predicted and value != 0:
        raise CostMatrixError("the diagonal must be 0", true=true, predicted=predicted, row=row)
    return value + 0.0  # -0.0 becomes 0.0, so that equal matrices serialise (and hash) the same


@dataclass(frozen=True, eq=False)
class CostMatrix:
    """An immutable K x K cost matrix over named classes (class order = model output order)."""

    classes: tuple[str, ...]
    matrix: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64, copy=True)
        k = len(self.classes)
        if len(set(self.classes)) != k:
            raise CostMatrixError("class names must be unique")
        if matrix.shape != (k, k):
            raise CostMatrixError(f"matrix shape {matrix.shape} does not match {k} classes")
        matrix.setflags(write=False)
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "matrix", matrix)
        self.validate()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def uniform(cls, classes: Sequence[str]) -> CostMatrix:
        """The 0-1 cost matrix: every error costs 1."""
        k = len(classes)
        return cls(tuple(classes), np.ones((k, k)) - np.eye(k))

    @classmethod
    def from_pairs(cls, classes: Sequence[str], pairs: Mapping[tuple[str, str], float], *,
                   default: float = DEFAULT_OFF_DIAGONAL_COST, max_cost: float = math.inf) -> CostMatrix:
        """Build from {(true, predicted): cost}; unlisted pairs cost `default` off the diagonal, 0 on it."""
        index = {name: i for i, name in enumerate(classes)}
        k = len(classes)
        matrix = np.full((k, k), float(default))
        np.fill_diagonal(matrix, 0.0)
        for (true, predicted), cost in pairs.items():
            for name in (true, predicted):
                if name not in index:
                    raise CostMatrixError(f"unknown class {name!r}", true=true, predicted=predicted)
            matrix[index[true], index[predicted]] = check_cost(true, predicted, cost, max_cost=max_cost)
        return cls(tuple(classes), matrix)

    @classmethod
    def pareto(cls, classes: Sequence[str], *, seed: int, shape: float = 1.5, scale: float = 1.0) -> CostMatrix:
        """The paper's random costs: off-diagonal c(y, z) ~ Pareto(scale=1, shape=1.5), seeded."""
        k = len(classes)
        rng = np.random.default_rng(seed)
        # numpy's pareto is the Lomax form; adding 1 and scaling gives the classical Pareto(scale, shape).
        matrix = scale * (1.0 + rng.pareto(shape, size=(k, k)))
        np.fill_diagonal(matrix, 0.0)
        return cls(tuple(classes), matrix)

    @classmethod
    def single_pair(cls, classes: Sequence[str], true: str, predicted: str) -> CostMatrix:
        """The paper's critical-pair study: one pair costs 1 and every other pair 0."""
        k = len(classes)
        matrix = np.zeros((k, k))
        matrix[list(classes).index(true), list(classes).index(predicted)] = 1.0
        return cls(tuple(classes), matrix)

    @classmethod
    def read_csv(cls, source: str | Path | io.TextIOBase | Iterable[str], classes: Sequence[str], *,
                 default: float = DEFAULT_OFF_DIAGONAL_COST, max_cost: float = math.inf,
                 resolve: Callable[[str], str] | None = None) -> CostMatrix:
        """Read the long form `true,predicted,cost` (or `true_ndc,predicted_ndc,cost`); see `read_cost_pairs`."""
        pairs = read_cost_pairs(source, classes, max_cost=max_cost, resolve=resolve)
        return cls.from_pairs(classes, pairs, default=default, max_cost=max_cost)

    # --- export -------------------------------------------------------------------------------
    def to_csv(self, *, header: tuple[str, str, str] = ("true", "predicted", "cost"),
               only_non_default: bool = True, default: float = DEFAULT_OFF_DIAGONAL_COST) -> str:
        """Write the long form; by default only the pairs whose cost differs from the default."""
        return write_cost_rows(((t, p, c) for t, p, c in self.entries() if not only_non_default or c != default),
                               header=header)

    def entries(self) -> list[tuple[str, str, float]]:
        """Every off-diagonal (true, predicted, cost) triple, row-major."""
        return [(t, p, float(self.matrix[i, j]))
                for i, t in enumerate(self.classes) for j, p in enumerate(self.classes) if i != j]

    # --- properties ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise CostMatrixError unless every cell is finite, non-negative, and the diagonal is 0."""
        bad = ~np.isfinite(self.matrix) | (self.matrix < 0)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise CostMatrixError(f"cost {self.matrix[i, j]} must be finite and non-negative",
                                  true=self.classes[i], predicted=self.classes[j])
        diagonal = np.diag(self.matrix)
        if (diagonal != 0).any():
            i = int(np.flatnonzero(diagonal)[0])
            raise CostMatrixError("the diagonal must be 0", true=self.classes[i], predicted=self.classes[i])

    def cost(self, true: str, predicted: str) -> float:
        """c(true, predicted)."""
        return float(self.matrix[self.classes.index(true), self.classes.index(predicted)])

    def tempered(self, tau: float) -> np.ndarray:
        """The pair-sampling distribution c~ = c^tau / sum c^tau over off-diagonal pairs (K x K, sums to 1)."""
        off_diagonal = self.matrix.copy()
        np.fill_diagonal(off_diagonal, 0.0)
        largest = off_diagonal.max()
        powered = np.zeros_like(self.matrix)
        positive = off_diagonal > 0
        # (c / max c)^tau: the same distribution, without overflow for large costs or tau (1e110^3 = inf).
        powered[positive] = np.power(off_diagonal[positive] / largest, tau)
        total = powered.sum()
        if total <= 0:
            raise CostMatrixError("every off-diagonal cost is 0: nothing to sample")
        return powered / total

    def critical_pairs(self, threshold: float) -> list[tuple[str, str, float]]:
        """Pairs with cost >= threshold, most expensive first."""
        pairs = [(t, p, c) for t, p, c in self.entries() if c >= threshold]
        return sorted(pairs, key=lambda item: (-item[2], item[0], item[1]))

    def reindexed(self, classes: Sequence[str], *, default: float = DEFAULT_OFF_DIAGONAL_COST) -> CostMatrix:
        """The same costs in another class order (e.g. a model's output order); new classes get the default."""
        pairs = {(t, p): c for t, p, c in self.entries() if t in classes and p in classes}
        return CostMatrix.from_pairs(classes, pairs, default=default)

    def fingerprint(self) -> str:
        """A SHA-256 over the class order and the costs, stable across processes."""
        digest = hashlib.sha256()
        digest.update("\x1f".join(self.classes).encode())
        digest.update(np.ascontiguousarray(self.matrix, dtype="<f8").tobytes())
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CostMatrix):
            return NotImplemented
        return self.classes == other.classes and np.array_equal(self.matrix, other.matrix)

    def __hash__(self) -> int:
        return hash(self.fingerprint())


def _format_cost(cost: float) -> str:
    return str(int(cost)) if float(cost).is_integer() else repr(float(cost))


def _resolved(name: str, resolve: Callable[[str], str], *, true: str, predicted: str, row: int) -> str:
    """`resolve(name)`, or the row's unknown-class error with the resolver's reason."""
    try:
        return resolve(name)
    except ValueError as exc:
        raise CostMatrixError(f"unknown class {name[:40]!r}: {exc}", true=true[:40], predicted=predicted[:40],
                              row=row) from None


def read_cost_pairs(source: str | Path | io.TextIOBase | Iterable[str], classes: Collection[str], *,
                    max_cost: float = math.inf, resolve: Callable[[str], str] | None = None,
                    ) -> dict[tuple[str, str], float]:
    """The listed cells of a long-form CSV `true,predicted,cost` (or `true_ndc,predicted_ndc,cost`), checked.

    Memory and time grow with the rows, not with len(classes) squared, so a service with a large catalog
    can import a short file. `resolve` maps each name as written to its class (e.g. any NDC form to its
    product key); a ValueError it raises is reported as that row's unknown class. By default names must
    be classes. A pair listed twice, an unknown class, or a bad cost raises CostMatrixError with the row.
    """
    if isinstance(source, str | Path):
        with open(source, newline="", encoding="utf-8-sig") as handle:  # Excel's CSVs start with a BOM
            return read_cost_pairs(handle, classes, max_cost=max_cost, resolve=resolve)
    lines = iter(source)
    first = next(lines, None)
    # A byte-order mark (Excel and PowerShell write one) must go before the csv module reads the header:
    # left in, it hides a quoted first field's quotes (`\ufeff"true"` reads as `"true"` with the quotes).
    rows = lines if first is None else itertools.chain([first.lstrip("\ufeff")], lines)
    reader = csv.DictReader(rows, restkey=_EXTRA_FIELDS)
    try:
        return _read_rows(reader, classes if isinstance(classes, set | frozenset) else set(classes),
                          max_cost=max_cost, resolve=resolve)
    except csv.Error as exc:  # e.g. a field over the csv module's size limit, or a NUL byte
        # line_num counts the lines of the records read whole; the bad one starts after them.
        raise CostMatrixError(f"not readable as CSV: {exc}", row=reader.line_num + 1) from None


def _read_rows(reader: csv.DictReader[str], known: Collection[str], *, max_cost: float,
               resolve: Callable[[str], str] | None) -> dict[tuple[str, str], float]:
    fields = [name.strip() for name in (reader.fieldnames or [])]
    true_col = next((c for c in _TRUE_COLUMNS if c in fields), None)
    pred_col = next((c for c in _PREDICTED_COLUMNS if c in fields), None)
    if true_col is None or pred_col is None or "cost" not in fields:
        raise CostMatrixError(f"CSV header must be 'true,predicted,cost' (got {','.join(fields)!r})", row=1)
    pairs: dict[tuple[str, str], float] = {}
    for row_number, raw in enumerate(reader, start=2):
        if _EXTRA_FIELDS in raw:
            raise CostMatrixError(f"{len(fields) + len(raw[_EXTRA_FIELDS])} fields where the header has "
                                  f"{len(fields)}", row=row_number)
        row = {(key or "").strip(): (value or "").strip() for key, value in raw.items()}
        true, predicted = row.get(true_col, ""), row.get(pred_col, "")
        if resolve is not None:
            true, predicted = (_resolved(name, resolve, true=true, predicted=predicted, row=row_number)
                               for name in (true, predicted))
        for name in (true, predicted):
            if name not in known:
                raise CostMatrixError(f"unknown class {name[:40]!r}", true=true[:40], predicted=predicted[:40],
                                      row=row_number)
        if (true, predicted) in pairs:
            raise CostMatrixError("pair listed twice", true=true, predicted=predicted, row=row_number)
        pairs[(true, predicted)] = check_cost(true, predicted, row.get("cost", ""), max_cost=max_cost, row=row_number)
    return pairs


def write_cost_rows(rows: Iterable[tuple[str, str, float]], *,
                    header: tuple[str, str, str] = ("true", "predicted", "cost")) -> str:
    """The long form of the given (true, predicted, cost) cells, in the given order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for true, predicted, cost in rows:
        writer.writerow([true, predicted, _format_cost(cost)])
    return out.getvalue()
