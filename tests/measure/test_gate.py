"""Gate expressions: parsed safely, type-checked when set, decided with the values shown."""

from __future__ import annotations

import pytest

from patchlab.errors import GateExpressionError
from patchlab.measure.gate import Gate, check_gates

VALUES = {"nfr": 0.1, "pfr": 0.02, "accuracy": 0.5, "old": 0.6, "verdict": "port with care"}


@pytest.mark.parametrize(
    "expr, passed",
    [
        ("nfr <= 0.05", False),
        ("nfr <= 0.15", True),
        ("accuracy >= old - 0.01", False),
        ("accuracy >= old * 0.8", True),
        ("verdict != 'do not port'", True),
        ('verdict == "safe to port"', False),
        ("0 <= pfr < 0.05", True),
        ("nfr < 0.2 and (pfr > 0.5 or not accuracy < 0.4)", True),
        ("-nfr > -0.2", True),
        ("accuracy / old >= 0.8", True),
    ],
)
def test_gates_decide(expr, passed):
    r = Gate.parse(expr).check(VALUES)
    assert r.passed is passed, r.detail
    assert ("true" if passed else "false") in r.detail


def test_detail_shows_the_values():
    r = Gate.parse("accuracy >= old - 0.01").check(VALUES)
    assert r.detail == "accuracy=0.5 >= (old=0.6 - 0.01) is false"


@pytest.mark.parametrize(
    "expr, pos, what",
    [
        ("nfr <=", 7, "expected a number"),
        ("nfr <= 0.05 and", 16, "expected a number"),
        ("foo < 1", 1, "unknown name 'foo'"),
        ("accuracy > 'x'", 10, "cannot compare a number with text"),
        ("verdict < 'do not port'", 9, "== or != only"),
        ("verdict == 'maybe'", 9, "not a verdict"),
        ("nfr", 4, "expected a comparison"),
        ("nfr + 1", 8, "expected a comparison"),
        ("nfr <= 0.05 @", 13, "unexpected character '@'"),
        ("(nfr <= 0.05", 13, "expected ')'"),
        ("", 1, "empty"),
        ("__import__('os')", 1, "unknown name"),
    ],
)
def test_bad_gates_say_where(expr, pos, what):
    with pytest.raises(GateExpressionError) as e:
        Gate.parse(expr)
    msg = str(e.value)
    assert f"position {pos}" in msg and what in msg and "\n" not in msg


def test_missing_value_fails_the_gate_and_says_which():
    (r,) = check_gates(["accuracy >= old - 0.01"], {**VALUES, "old": None})
    assert not r.passed and "old is unknown" in r.detail
