"""The one number grammar (:mod:`fairdeploy.grammar`): every place a user writes a number
as text reads it the same way, refuses what is not a finite number with one
``FairDeployError`` line naming the text, and does bounded work (issue 21 item 7)."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fairdeploy.errors import FairDeployError
from fairdeploy.grammar import NUMBER_HELP, NumberError, parse_number
from fairdeploy.plan import Plan
from fairdeploy.sweep import parse_grid, parse_selection

# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    ("text", "value"),
    [("0.5", 0.5), (".5", 0.5), ("5/9", 5 / 9), ("1/2.5", 0.4), ("1e-3/2", 0.0005),
     ("1 / 3", 1 / 3), ("50%", 0.5), ("1e308", 1e308), ("-0.25", -0.25), ("0e-999", 0.0),
     ("2.5E+2", 250.0)],
)
def test_numbers_in_the_grammar(text, value) -> None:
    assert parse_number(text, what="x") == value


@pytest.mark.parametrize(
    ("text", "problem"),
    [("1/0", "divides by zero"), ("0/0", "divides by zero"),
     ("1e400", "outside the float range"), ("2e308", "outside the float range"),
     ("1e-400", "outside the float range"), ("1e99999999", "exponent of more than"),
     ("1/1e99999999", "exponent of more than"), ("nan", "is not a number"),
     ("inf", "is not a number"), ("-inf", "is not a number"), ("0x10", "is not a number"),
     ("1_000", "is not a number"), ("", "is not a number"), ("5/", "is not a number"),
     ("1/2/3", "is not a number")],
)
def test_numbers_outside_the_grammar_are_one_line_naming_the_text(text, problem) -> None:
    with pytest.raises(NumberError) as info:
        parse_number(text, what="beta")
    msg = str(info.value)
    assert isinstance(info.value, FairDeployError) and "\n" not in msg
    assert msg.startswith(f"beta: {text!r}") and problem in msg and NUMBER_HELP in msg


def test_a_huge_exponent_is_refused_in_microseconds() -> None:
    """``1e99999999`` once cost 250 s of CPU (an exact fraction of 10^99999999)."""
    for text in ("1e99999999", "1e-99999999", "1/1e99999999", "9" * 50 + "e" + "9" * 40):
        start = time.perf_counter()
        with pytest.raises(NumberError):
            parse_number(text, what="x")
        assert time.perf_counter() - start < 0.01


_decimals = st.builds(
    lambda whole, frac, exp: f"{whole}{'.' + frac if frac else ''}{'e' + str(exp) if exp else ''}",
    st.integers(0, 10**6),
    st.text("0123456789", max_size=6),
    st.one_of(st.none(), st.integers(-400, 400)),
)


@given(num=_decimals, den=st.one_of(st.none(), _decimals), pct=st.booleans())
def test_any_number_text_is_its_exact_value_or_one_refusal(num, den, pct) -> None:
    """Independent reference: the exact rational (Python's Fraction) rounded once."""
    text = num + (f"/{den}" if den else "") + ("%" if pct else "")
    exact = Fraction(num) / (Fraction(den) if den else 1) if Fraction(den or 1) else None
    try:
        got = parse_number(text, what="x")
    except NumberError as exc:
        if exact is None:
            assert exc.problem == "divides by zero"
            return
        exact /= 100 if pct else 1
        assert "outside the float range" in exc.problem
        assert exact > Fraction(1.7976931348623157e308) or float(exact) == 0
        return
    assert exact is not None
    exact /= 100 if pct else 1
    assert math.isfinite(got) and got == float(exact)


@given(st.text(max_size=20))
def test_any_text_gives_a_finite_float_or_a_number_error(text) -> None:
    try:
        got = parse_number(text, what="x")
    except NumberError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(got, float) and math.isfinite(got)


# --------------------------------------------------------------------------- every place


_BAD = ["1/0", "1e400", "1e99999999", "nan", "inf"]


@pytest.mark.parametrize("text", _BAD)
def test_select_numbers_are_one_error_line(text) -> None:
    rule = f"min eodd s.t. cr >= {text}"
    with pytest.raises(FairDeployError, match=r"^--select .* at character \d+; use: "):
        parse_selection(rule)


@pytest.mark.parametrize(("text", "value"), [("1/2.5", 0.4), ("1e-3/2", 0.0005),
                                             ("1/1e3", 0.001), ("50%", 0.5)])
def test_select_fractions_are_accepted(text, value) -> None:
    (c,) = parse_selection(f"min eodd s.t. cr >= {text}").constraints
    assert c.constant == pytest.approx(value)


@pytest.mark.parametrize("text", [*_BAD, "0:1e300:1e-300", "0:1:1/0"])
@pytest.mark.parametrize("key", ["sr", "beta", "rank"])
def test_grid_numbers_are_one_error_line(key, text) -> None:
    with pytest.raises(FairDeployError, match=rf"^--grid {key}") as info:
        parse_grid([f"{key}={text}"])
    assert "\n" not in str(info.value)
    with pytest.raises(FairDeployError):
        parse_grid({key: text})  # a recipe's sweep.grid


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**400])
def test_grid_yaml_numbers_must_be_finite(value) -> None:
    with pytest.raises(FairDeployError, match="--grid beta"):
        parse_grid({"beta": [value]})


@pytest.mark.parametrize("text", _BAD)
@pytest.mark.parametrize("key", ["beta", "prune_ratio"])
def test_plan_numbers_are_one_error_line(key, text) -> None:
    name = "fairprune" if key == "prune_ratio" else "fairlrf"
    extra = {} if name == "fairprune" else {"layers": [{"layer": "fc", "rank": 2}]}
    with pytest.raises(FairDeployError) as info:
        Plan(name, **extra, **{key: text})
    msg = str(info.value)
    assert msg.startswith(f"plan {name!r}: {key}: {text!r} is not allowed (") and "\n" not in msg
    assert msg.endswith("use a number or a fraction such as 5/9)")


def test_plan_fraction_text_is_read_by_the_grammar() -> None:
    plan = Plan("fairlrf", [{"layer": "fc", "rank": 2}], beta="1/2.5")
    assert plan.beta == 0.4 and plan.layers[0].beta == 0.4


def _recipe(tmp_path, sweep: dict) -> str:
    import yaml

    from fairdeploy.recipe import load_recipe

    data = {
        "model": {"arch": "mlp", "num_classes": 3, "kwargs": {"in_features": 8}},
        "data": {"kind": "npz", "path": "d.npz"},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 8}]},
        "sweep": sweep,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(FairDeployError) as info:
        load_recipe(tmp_path / "r.yaml")
    return str(info.value)


@pytest.mark.parametrize("text", _BAD)
def test_a_recipes_sweep_section_refuses_bad_numbers_in_one_line(tmp_path, text) -> None:
    select = _recipe(tmp_path, {"select": f"min eodd s.t. cr >= {text}"})
    grid = _recipe(tmp_path, {"grid": {"sr": f"0,{text}"}})
    for msg in (select, grid):
        assert "\n" not in msg and "r.yaml" in msg and repr(text) in msg
    assert "sweep.select" in select and "sweep.grid" in grid


@pytest.mark.parametrize("text", _BAD)
@pytest.mark.parametrize(
    "args",
    [["cache", "prune", "--keep-days"], ["verify", "m.onnx", "--atol"],
     ["sweep", "ck.pt", "--recipe", "r.yaml", "--guard-tolerance"]],
    ids=["keep-days", "atol", "guard-tolerance"],
)
def test_number_options_use_the_grammar(tmp_path, args, text) -> None:
    """``--guard-tolerance nan`` once switched the collapse guard off in effect."""
    from click.testing import CliRunner

    from fairdeploy.cli import main

    result = CliRunner().invoke(main, [*args, text], catch_exceptions=False)
    assert result.exit_code == 2 and repr(text) in result.output
    assert "Traceback" not in result.output


def test_number_options_take_fractions(tmp_path) -> None:
    from fairdeploy.cli import _Number

    assert _Number(min=0, max=1).convert("1/2.5", None, None) == 0.4
    assert _Number(min=0).convert("50%", None, None) == 0.5


@pytest.mark.parametrize("tolerance", [float("nan"), float("inf"), -0.1, 2.0])
def test_run_sweep_refuses_a_tolerance_outside_0_1(tmp_path, tolerance) -> None:
    import yaml

    from fairdeploy.commands.sweep import run_sweep

    data = {
        "model": {"arch": "mlp", "num_classes": 3, "kwargs": {"in_features": 8}},
        "data": {"kind": "npz", "path": str(tmp_path / "d.npz")},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 8}]},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(FairDeployError, match=r"^guard_tolerance=.* use a number in \[0, 1\]$"):
        run_sweep(tmp_path / "ck.pt", tmp_path / "r.yaml", grid=["sr=0.5"],
                  guard_tolerance=tolerance, out=tmp_path / "out", progress=False)
