"""The text grammar of everything a user writes as a number, a grid or a selection rule.

One module, below both :mod:`fairdeploy.recipe` and :mod:`fairdeploy.sweep`, so a recipe's
``sweep:`` section and the command line read the same text the same way.

**Numbers** (:func:`parse_number`, the one number parser: ``--select``, ``--grid``, a
recipe's ``sweep:`` section, every fraction-valued recipe key such as ``beta``,
``prune_ratio``, ``sr``)::

    NUMBER  := [ "+" | "-" ] DECIMAL [ "/" DECIMAL ] [ "%" ]   (no sign inside a rule:
               there "-" is the operator of ``vanilla - 0.01``)
    DECIMAL := digits [ "." digits ] [ ("e" | "E") [ "+" | "-" ] digits ]   (or ". digits")

``0.5``, ``.5``, ``5/9``, ``1/2.5`` (0.4), ``1e-3/2`` (0.0005), ``50%`` (0.5). The
value must be a finite float: ``1/0``, ``1e400`` (above the float range), ``1e-400``
(below it, but not zero), ``nan`` and ``inf`` are refused with one
:class:`~fairdeploy.errors.FairDeployError` naming the text and what is allowed. An
exponent of more than :data:`MAX_EXPONENT_DIGITS` digits is refused before anything is
computed, so ``1e99999999`` costs microseconds.

**Selection rules** (:func:`parse_selection`)::

    rule       := ("min" | "max") METRIC [ ("s.t." | "subject to" | "where") constraints ]
    constraints:= constraint ( ("and" | "," | "&") constraint )*
    constraint := METRIC (">=" | "<=" | ">" | "<" | "≥" | "≤") bound
    bound      := term ( ("+" | "-") term )*
    term       := NUMBER [ "*" REF ] | REF [ "*" NUMBER ]
    REF        := "vanilla" | "svd"        (the same metric of the vanilla model, or of
                                            truncated SVD at the point's layers and ranks)
    METRIC     := accuracy | balanced_accuracy (= macro_recall) | avg_precision (= precision)
                | avg_recall | avg_f1 | eodd | eopp1 (= eopp) | eopp0 | cr

e.g. ``min eodd s.t. avg_precision >= vanilla - 0.01``,
``max avg_precision s.t. eodd <= 0.8 * vanilla and cr >= 1.5``.

**Grids** (:func:`parse_grid`): ``KEY=VALUES`` with KEY one of :data:`GRID_KEYS` and
VALUES a comma-separated list of NUMBERs (``rr=0,0.25,0.5``, ``beta=1/3,5/9``), an
inclusive range ``start:stop:step`` (``sr=0:0.9:0.1``), or layer names (``layer=all``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from fairdeploy.errors import FairDeployError

__all__ = [
    "ACCURACY_LIKE",
    "DEFAULT_GUARD_TOLERANCE",
    "GRAMMAR",
    "GRID_KEYS",
    "MAX_EXPONENT_DIGITS",
    "NUMBER_HELP",
    "SELECT_METRICS",
    "Constraint",
    "NumberError",
    "Selection",
    "parse_grid",
    "parse_grid_values",
    "parse_number",
    "parse_selection",
]

# --------------------------------------------------------------------------- numbers

#: What :func:`parse_number` accepts, for messages.
NUMBER_HELP = (
    "a finite number such as 0.5, .5 or 1e-3, a fraction a/b such as 5/9 or 1/2.5, or a "
    "percentage such as 50%"
)
#: Exponents have at most this many digits (1e999 is already far outside the float range).
MAX_EXPONENT_DIGITS = 3
_DECIMAL = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
#: A NUMBER of the grammar, as a regular expression (spaces allowed around ``/``).
NUMBER_PATTERN = rf"{_DECIMAL}(?:\s*/\s*{_DECIMAL})?%?"
_NUMBER = re.compile(rf"\s*(?P<num>[-+]?{_DECIMAL})(?:\s*/\s*(?P<den>{_DECIMAL}))?(?P<pct>%?)\s*")
_EXPONENT = re.compile(r"[eE][-+]?(\d+)")


def _decimal(text: str) -> Fraction | None:
    """A DECIMAL as an exact fraction, None when its exponent is too long to compute."""
    m = _EXPONENT.search(text)
    if m is not None and len(m.group(1).lstrip("0")) > MAX_EXPONENT_DIGITS:
        return None
    return Fraction(text)


class NumberError(FairDeployError):
    """A number outside the grammar: ``what``, the ``text`` and the ``problem``."""

    def __init__(self, what: str, text: str, problem: str) -> None:
        super().__init__(f"{what}: {text!r} {problem}; use {NUMBER_HELP}")
        self.what, self.text, self.problem = what, text, problem


def parse_number(text: str, *, what: str) -> float:
    """The value of a NUMBER of the grammar (module docstring) as a finite float.

    Parameters
    ----------
    text : str
        What the user wrote.
    what : str
        Where it was written (``--grid sr``, ``beta``), for the message.

    Raises
    ------
    NumberError
        (a :class:`~fairdeploy.errors.FairDeployError`) Text outside the grammar, a zero
        denominator, or a value outside the float range (too large, or too small to be
        told from 0), naming ``what``, the text and what is allowed. Bounded work: an
        exponent's digits are counted before any arithmetic.
    """
    shown = str(text).strip()
    m = _NUMBER.fullmatch(str(text))
    if m is None:
        raise NumberError(what, shown, "is not a number")
    num, den = _decimal(m.group("num")), Fraction(1)
    if m.group("den") is not None:
        den = _decimal(m.group("den"))  # type: ignore[assignment]
    if num is None or den is None:
        raise NumberError(
            what, shown,
            f"is outside the float range (an exponent of more than {MAX_EXPONENT_DIGITS} digits)",
        )
    if den == 0:
        raise NumberError(what, shown, "divides by zero")
    exact = num / den / (100 if m.group("pct") else 1)
    try:
        value = float(exact)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or (value == 0 and exact != 0):
        raise NumberError(what, shown, "is outside the float range (about 1e-308 to 1e308)")
    return value


# --------------------------------------------------------------------------- selection rules

#: Guard tolerance when the rule has no ``METRIC >= vanilla - t`` constraint.
DEFAULT_GUARD_TOLERANCE = 0.01

#: Metric names the rule accepts → the sweep's metric (aliases included).
SELECT_METRICS: dict[str, str] = {
    "accuracy": "accuracy",
    "acc": "accuracy",
    "balanced_accuracy": "balanced_accuracy",
    "macro_recall": "balanced_accuracy",
    "avg_precision": "avg_precision",
    "precision": "avg_precision",
    "avg_recall": "avg_recall",
    "avg_f1": "avg_f1",
    "eodd": "eodd",
    "eopp1": "eopp1",
    "eopp": "eopp1",
    "eopp0": "eopp0",
    "cr": "cr",
}
#: The metrics whose ``METRIC >= vanilla - t`` constraints set the collapse guard's
#: tolerance: how far the rule lets predictive performance fall below vanilla's.
ACCURACY_LIKE = frozenset(
    {"accuracy", "balanced_accuracy", "avg_precision", "avg_recall", "avg_f1"}
)
_REFS = {"vanilla": "vanilla", "svd": "svd", "truncated_svd": "svd"}
_OPS = {">=": ">=", "≥": ">=", "<=": "<=", "≤": "<=", ">": ">", "<": "<"}

GRAMMAR = (
    "use: min|max METRIC [s.t. METRIC OP BOUND [and METRIC OP BOUND ...]], OP one of "
    ">= <= > <, BOUND a number, vanilla or svd, optionally ± a number or × a factor "
    "(e.g. 'min eodd s.t. avg_precision >= vanilla - 0.01'); METRIC one of "
    "accuracy, balanced_accuracy (macro_recall), avg_precision, avg_recall, avg_f1, "
    "eodd, eopp1 (eopp), eopp0, cr"
)

_TOKEN = re.compile(
    rf"\s*(?:(?P<num>{NUMBER_PATTERN})"
    r"|(?P<op>>=|<=|≥|≤|>|<)"
    r"|(?P<sym>[-+*,&])"
    r"|(?P<st>s\.t\.|subject\s+to)"
    r"|(?P<word>[a-z_][a-z0-9_.]*))",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``, the bound ``constant + Σ coefficient · reference``."""

    metric: str
    op: str
    constant: float
    refs: tuple[tuple[str, float], ...]
    text: str

    def bound(self, refs: Mapping[str, float | None]) -> float | None:
        """The bound for a point, given ``{"vanilla": value, "svd": value}`` of the
        constraint's metric (None: a reference is undefined, so is the bound)."""
        total = self.constant
        for name, coef in self.refs:
            value = refs.get(name)
            if value is None or math.isnan(value):
                return None
            total += coef * value
        return total

    def holds(self, value: float | None, refs: Mapping[str, float | None]) -> bool:
        """Whether ``value`` satisfies the constraint (an undefined side fails it)."""
        bound = self.bound(refs)
        if value is None or bound is None or math.isnan(value):
            return False
        eps = 1e-12  # values read back from text: equal up to rounding is equal
        return {
            ">=": value >= bound - eps,
            "<=": value <= bound + eps,
            ">": value > bound + eps,
            "<": value < bound - eps,
        }[self.op]

    def vanilla_tolerance(self) -> float | None:
        """``t`` when the constraint reads ``metric >= vanilla - t`` (≥ or >) on an
        accuracy-like metric (:data:`ACCURACY_LIKE`), else None: a fairness gap or the
        C.R. allowed to move says nothing about how far accuracy may fall."""
        if (
            self.metric in ACCURACY_LIKE
            and self.op in (">=", ">")
            and self.refs == (("vanilla", 1.0),)
            and self.constant <= 0
        ):
            return -self.constant
        return None


@dataclass(frozen=True)
class Selection:
    """A parsed ``--select`` rule (see the module docstring for the grammar)."""

    text: str
    goal: str  # "min" or "max"
    metric: str
    constraints: tuple[Constraint, ...]

    def guard_tolerance(self) -> float:
        """The collapse guard's tolerance: the largest ``t`` among the rule's
        ``METRIC >= vanilla - t`` constraints on accuracy-like metrics
        (:data:`ACCURACY_LIKE`), else :data:`DEFAULT_GUARD_TOLERANCE`."""
        found = [t for c in self.constraints if (t := c.vanilla_tolerance()) is not None]
        return max(found) if found else DEFAULT_GUARD_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "rule": self.text,
            "objective": f"{self.goal} {self.metric}",
            "constraints": [c.text for c in self.constraints],
        }


class _Tokens:
    def __init__(self, text: str) -> None:
        self.text = text
        self.items: list[tuple[str, str, int]] = []
        pos = 0
        stripped = text.rstrip()
        while pos < len(stripped):
            m = _TOKEN.match(stripped, pos)
            if m is None or m.end() == pos:
                self.fail(f"unexpected {stripped[pos:].strip()[:12]!r}", pos)
            assert m is not None
            kind = m.lastgroup or ""
            self.items.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, problem: str, pos: int | None = None) -> None:
        if pos is None:
            pos = self.items[self.i][2] if self.i < len(self.items) else len(self.text)
        raise FairDeployError(
            f"--select {self.text!r}: {problem} at character {pos + 1}; {GRAMMAR}"
        )

    def peek(self) -> tuple[str, str] | None:
        if self.i >= len(self.items):
            return None
        kind, value, _ = self.items[self.i]
        return kind, value

    def take(self) -> tuple[str, str]:
        item = self.peek()
        if item is None:
            self.fail("the rule ends too early")
        self.i += 1
        assert item is not None
        return item


def _metric(tokens: _Tokens) -> str:
    item = tokens.peek()
    if item is None or item[0] != "word" or item[1].lower() not in SELECT_METRICS:
        what = "the end" if item is None else repr(item[1])
        tokens.fail(f"expected a metric, found {what}")
    tokens.take()
    assert item is not None
    return SELECT_METRICS[item[1].lower()]


def _number(tokens: _Tokens, text: str) -> float:
    """A NUMBER of the rule (the token just before the parser's position)."""
    try:
        return parse_number(text, what="number")
    except NumberError as exc:
        tokens.i -= 1
        tokens.fail(f"{exc.text!r} {exc.problem}")
        raise AssertionError from None  # unreachable: fail raises


def _term(tokens: _Tokens) -> tuple[float, str | None]:
    """A term of a bound: ``(coefficient or constant, reference name or None)``."""
    item = tokens.peek()
    if item is None:
        tokens.fail("the bound ends too early")
    assert item is not None
    kind, value = item
    if kind == "num":
        tokens.take()
        number = _number(tokens, value)
        if tokens.peek() == ("sym", "*"):
            tokens.take()
            return number, _ref(tokens)
        return number, None
    if kind == "word" and value.lower() in _REFS:
        ref = _ref(tokens)
        if tokens.peek() == ("sym", "*"):
            tokens.take()
            nxt = tokens.take()
            if nxt[0] != "num":
                tokens.fail(f"expected a number after '*', found {nxt[1]!r}")
            return _number(tokens, nxt[1]), ref
        return 1.0, ref
    tokens.fail(f"expected a number, vanilla or svd, found {value!r}")
    raise AssertionError  # unreachable


def _ref(tokens: _Tokens) -> str:
    kind, value = tokens.take()
    if kind != "word" or value.lower() not in _REFS:
        tokens.fail(f"expected vanilla or svd, found {value!r}")
    return _REFS[value.lower()]


def _constraint(tokens: _Tokens) -> Constraint:
    start = tokens.i
    metric = _metric(tokens)
    kind, op = tokens.take()
    if kind != "op":
        tokens.i -= 1
        tokens.fail(f"expected >=, <=, > or < after {metric}, found {op!r}")
    constant = 0.0
    refs: dict[str, float] = {}
    sign = 1.0
    while True:
        coef, ref = _term(tokens)
        if ref is None:
            constant += sign * coef
        else:
            refs[ref] = refs.get(ref, 0.0) + sign * coef
        nxt = tokens.peek()
        if nxt in (("sym", "+"), ("sym", "-")):
            tokens.take()
            sign = 1.0 if nxt == ("sym", "+") else -1.0
            continue
        break
    end = tokens.items[tokens.i - 1]
    text = tokens.text[tokens.items[start][2] : end[2] + len(end[1])]
    return Constraint(metric, _OPS[op], constant, tuple(sorted(refs.items())), text)


def parse_selection(text: str) -> Selection:
    """Parse a ``--select`` rule (grammar in the module docstring).

    Raises
    ------
    FairDeployError
        Anything outside the grammar, naming the character where parsing stopped.
    """
    if not isinstance(text, str) or not text.strip():
        raise FairDeployError(f"--select: the rule is empty; {GRAMMAR}")
    tokens = _Tokens(text.strip())
    kind, word = tokens.take()
    goal = {"min": "min", "minimize": "min", "max": "max", "maximize": "max"}.get(word.lower())
    if kind != "word" or goal is None:
        tokens.i -= 1
        tokens.fail(f"a rule starts with min or max, found {word!r}")
    assert goal is not None
    metric = _metric(tokens)
    constraints: list[Constraint] = []
    nxt = tokens.peek()
    if nxt is not None:
        if not (nxt[0] == "st" or (nxt[0] == "word" and nxt[1].lower() in ("where", "st"))):
            tokens.fail(f"expected s.t. (or the end) after the objective, found {nxt[1]!r}")
        tokens.take()
        constraints.append(_constraint(tokens))
        while (nxt := tokens.peek()) is not None:
            if nxt in (("sym", ","), ("sym", "&")) or (
                nxt[0] == "word" and nxt[1].lower() == "and"
            ):
                tokens.take()
                constraints.append(_constraint(tokens))
            else:
                tokens.fail(f"expected 'and' between constraints, found {nxt[1]!r}")
    return Selection(tokens.text, goal, metric, tuple(constraints))


# --------------------------------------------------------------------------- grids

#: The settings a grid can vary, outermost first (the order of the sweep's rows).
GRID_KEYS = ("layer", "rank", "sr", "rr", "beta")
# A grid this large is a typo (a step of 0.0001), not a sweep.
_MAX_VALUES = 1000
_HELP = (
    "write KEY=VALUES with KEY one of layer, rank, sr, rr, beta and VALUES a comma-separated "
    "list (rr=0,0.25,0.5; beta=1/3,5/9), an inclusive range start:stop:step (sr=0:0.9:0.1) "
    "or, for layer, all"
)


def _grid_number(item: Any, key: str) -> float:
    """A grid value: a YAML number, or text in the number grammar."""
    if isinstance(item, int | float) and not isinstance(item, bool):
        try:
            value = float(item)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise FairDeployError(
                f"--grid {key}: {item!r} is not a finite number; use {NUMBER_HELP}"
            )
        return value
    return parse_number(str(item), what=f"--grid {key}")


def _range(text: str, key: str) -> list[float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise FairDeployError(
            f"--grid {key}={text}: a range is start:stop:step, e.g. 0:0.9:0.1 (three numbers)"
        )
    start, stop, step = (_grid_number(p, key) for p in parts)
    if step <= 0:
        raise FairDeployError(f"--grid {key}={text}: the step must be > 0")
    if stop < start:
        raise FairDeployError(f"--grid {key}={text}: stop {stop:g} is below start {start:g}")
    span = (stop - start) / step  # may overflow to inf with a tiny step
    count = math.floor(span + 1e-9) + 1 if span < _MAX_VALUES else _MAX_VALUES + 1
    if count > _MAX_VALUES:
        raise FairDeployError(
            f"--grid {key}={text}: more than {_MAX_VALUES} values; at most {_MAX_VALUES} per "
            "key (a larger step?)"
        )
    # Rounded so 0.1 * 3 is 0.3, as written, not 0.30000000000000004.
    return [round(start + i * step, 12) for i in range(count)]


def parse_grid_values(key: str, value: Any) -> tuple[Any, ...]:
    """The values of one grid key, from the command line's text or the recipe's YAML.

    Parameters
    ----------
    key : str
        One of :data:`GRID_KEYS`.
    value : str, number or list
        ``"0:0.9:0.1"``, ``"1/3,5/9,0.8"``, ``"all"`` (layer), a number, or a YAML list of
        numbers / fraction strings / layer names.

    Returns
    -------
    tuple
        The values in the order given (duplicates removed): floats for sr, rr and β,
        ints for rank, names (or ``"all"``) for layer.

    Raises
    ------
    FairDeployError
        An unknown key, an empty list, a value out of range (sr and rr in [0, 1], β ≥ 0,
        rank an integer ≥ 1).
    """
    if key not in GRID_KEYS:
        raise FairDeployError(f"--grid {key}: unknown key; {_HELP}")
    if isinstance(value, bool):
        raise FairDeployError(f"--grid {key}: {value!r} is not allowed; {_HELP}")
    items: list[Any]
    if isinstance(value, str):
        text = value.strip()
        if key != "layer" and ":" in text:
            items = list(_range(text, key))
        else:
            items = [v.strip() for v in text.split(",")]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        items = [value]
    if not items or any(isinstance(v, str) and not v for v in items):
        raise FairDeployError(f"--grid {key}: an empty value; {_HELP}")
    out: list[Any] = []
    for item in items:
        if isinstance(item, bool):
            raise FairDeployError(f"--grid {key}: {item!r} is not allowed; {_HELP}")
        if key == "layer":
            v: Any = str(item)
        elif key == "rank":
            number = _grid_number(item, key)
            if number != int(number) or number < 1:
                raise FairDeployError(f"--grid rank: {item!r} is not allowed (use integers ≥ 1)")
            v = int(number)
        else:
            v = _grid_number(item, key)
            if key in ("sr", "rr") and not 0.0 <= v <= 1.0:
                raise FairDeployError(
                    f"--grid {key}: {item!r} is not allowed (use numbers in [0, 1])"
                )
            if key == "beta" and v < 0:
                raise FairDeployError(f"--grid beta: {item!r} is not allowed (use numbers ≥ 0)")
        if v not in out:
            out.append(v)
    if key == "layer" and "all" in out and len(out) > 1:
        raise FairDeployError("--grid layer: all already names every Linear layer; give it alone")
    return tuple(out)


def parse_grid(items: Iterable[str] | Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """A grid from ``KEY=VALUES`` strings (the command line) or a mapping (the recipe).

    Returns ``{key: values}`` in :data:`GRID_KEYS` order. A key given twice is an error.
    """
    pairs: list[tuple[str, Any]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        for item in items:
            key, sep, values = str(item).partition("=")
            if not sep:
                raise FairDeployError(f"--grid {item!r}: {_HELP}")
            pairs.append((key.strip(), values))
    grid: dict[str, tuple[Any, ...]] = {}
    for key, values in pairs:
        if key in grid:
            raise FairDeployError(f"--grid {key}: given twice; give each key once")
        grid[key] = parse_grid_values(key, values)
    return {k: grid[k] for k in GRID_KEYS if k in grid}
