"""``--select``: the rule that picks a sweep point on the validation split, and the
collapse guard every selection applies.

Grammar (case-insensitive; spaces optional around operators)::

    rule       := ("min" | "max") METRIC [ ("s.t." | "subject to" | "where") constraints ]
    constraints:= constraint ( ("and" | "," | "&") constraint )*
    constraint := METRIC (">=" | "<=" | ">" | "<" | "≥" | "≤") bound
    bound      := term ( ("+" | "-") term )*
    term       := NUMBER [ "*" REF ] | REF [ "*" NUMBER ]
    REF        := "vanilla" | "svd"        (the same metric of the vanilla model, or of
                                            truncated SVD at the point's layers and ranks)
    NUMBER     := 0.01 | .5 | 1e-3 | 5/9 | 1%     (1% is 0.01)
    METRIC     := accuracy | balanced_accuracy (= macro_recall) | avg_precision (= precision)
                | avg_recall | avg_f1 | eodd | eopp1 (= eopp) | eopp0 | cr

e.g. ``min eodd s.t. avg_precision >= vanilla - 0.01``,
``max avg_precision s.t. eodd <= 0.8 * vanilla and cr >= 1.5``.

Values are validation-split values; with several scoring draws the rule reads each
metric's median over the draws. Ties in the objective go to the higher C.R., then to the
earlier grid point.

**The collapse guard.** A model drifting toward one class can lower every fairness gap
and even raise macro precision (few positive predictions, mostly right), so every
selection also rejects a point whose accuracy or balanced accuracy (macro recall) falls
more than the tolerance below vanilla's, or where any group's rate of predicting any
class falls below half of vanilla's — in ANY draw, not only the median. The tolerance is
the largest ``t`` of the rule's ``METRIC >= vanilla - t`` constraints on accuracy-like
metrics (accuracy, balanced_accuracy, avg_precision, avg_recall, avg_f1; 0.01 when it
has none), unless given; a constraint on a fairness gap or the C.R. never loosens it. A
point whose accuracy, macro recall or a group's class rate is undefined (NaN) where
vanilla's is defined fails the guard. The guard can be switched off.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from fairdeploy.errors import FairDeployError

__all__ = [
    "ACCURACY_LIKE",
    "DEFAULT_GUARD_TOLERANCE",
    "GRAMMAR",
    "SELECT_METRICS",
    "Constraint",
    "Selection",
    "guard_reasons",
    "parse_selection",
]

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
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?(?:\s*/\s*\d+(?:\.\d*)?)?%?)"
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


def _number(text: str) -> float:
    percent = text.endswith("%")
    value = float(Fraction(text.rstrip("%").replace(" ", "")))
    return value / 100 if percent else value


def _term(tokens: _Tokens) -> tuple[float, str | None]:
    """A term of a bound: ``(coefficient or constant, reference name or None)``."""
    item = tokens.peek()
    if item is None:
        tokens.fail("the bound ends too early")
    assert item is not None
    kind, value = item
    if kind == "num":
        tokens.take()
        number = _number(value)
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
            return _number(nxt[1]), ref
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


def guard_reasons(
    draws: Sequence[Mapping[str, Any]],
    vanilla: Mapping[str, Any],
    *,
    tolerance: float,
    class_names: Sequence[str],
    group_names: Sequence[str],
    seeds: Sequence[int | None] | None = None,
) -> list[str]:
    """Why the collapse guard rejects a point (empty: it passes).

    Parameters
    ----------
    draws : sequence of mappings
        The point's metrics per scoring draw (:func:`~fairdeploy.metrics.summary_metrics`
        results: ``accuracy``, ``balanced_accuracy``, ``predicted_rates``).
    vanilla : mapping
        The vanilla model's metrics on the same split.
    tolerance : float
        Allowed drop of accuracy and balanced accuracy below vanilla's.
    class_names, group_names : sequences of str
        For the messages.
    seeds : sequence, optional
        The draws' seeds, named in the messages when there are several draws.

    Returns
    -------
    list of str
        One reason per failed check, for the first draw that fails.
    """
    for d, m in enumerate(draws):
        reasons = []
        for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "macro recall")):
            value, ref = m.get(key), vanilla.get(key)
            if ref is None or math.isnan(ref):
                continue
            if value is None or math.isnan(value):
                reasons.append(f"{label} is undefined (vanilla's is {ref:.4f})")
            elif value < ref - tolerance - 1e-12:
                reasons.append(
                    f"{label} {value:.4f} < vanilla's {ref:.4f} − {tolerance:g}"
                )
        rates, ref_rates = m.get("predicted_rates"), vanilla.get("predicted_rates")
        if rates is not None and ref_rates is not None:
            for g, (row, ref_row) in enumerate(zip(rates, ref_rates, strict=True)):
                for k, (r, ref) in enumerate(zip(row, ref_row, strict=True)):
                    if ref is None or math.isnan(ref) or ref <= 0:
                        continue
                    if r is None or math.isnan(r):
                        reasons.append(
                            f"group {group_names[g]!r}'s rate of predicting class "
                            f"{class_names[k]!r} is undefined (vanilla's is {100 * ref:.1f} %)"
                        )
                    elif r < 0.5 * ref:
                        reasons.append(
                            f"group {group_names[g]!r} predicts class {class_names[k]!r} for "
                            f"{100 * r:.1f} % of its samples, below half of vanilla's "
                            f"{100 * ref:.1f} %"
                        )
        if reasons:
            if seeds is not None and len(draws) > 1:
                reasons = [f"draw seed {seeds[d]}: {reasons[0]}", *reasons[1:]]
            return reasons
    return []
