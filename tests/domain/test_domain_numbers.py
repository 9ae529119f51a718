"""The representable-number rule of ``stream_app.domain.numbers``, pinned against orjson.

``representable(v)`` promises that the JSON text written for ``v`` is exactly
``v`` and, for an integral ``v``, a signed 64-bit integer. These tests check
that promise on the bytes ``stream_app.json.dumps`` really writes, and check
the fast paths against a slow reference written from the definition.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.domain.numbers import (
    MONEY_LIMIT,
    MONEY_LIMIT_FLOAT,
    json_money,
    json_number,
    representable,
    to_decimal,
)
from stream_app.json import dumps

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1


def reference(value: Decimal) -> bool:
    """The definition in the numbers module docstring, with no shortcut."""
    if not value.is_finite() or not I64_MIN <= value <= I64_MAX:
        return False
    if value == value.to_integral_value():
        return True
    return Decimal(repr(float(value))) == value


def written(value: Decimal) -> tuple[Decimal, bool]:
    """The decimal the emitted JSON text denotes, and whether it is an integer literal."""
    text = dumps(json_number(value)).decode()
    return Decimal(text), not any(c in text for c in ".eE")


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-0.0",
        "0.1",
        "19.99",
        "0.3",
        "123456.789",
        "0.30000000000000004",  # 17 digits, the shortest form of its double
        "999999999999999.9",  # 16 digits, shortest form
        "5e-324",  # the smallest subnormal prints as itself
        "1e-307",
        "9007199254740993",  # 2^53 + 1: not a double, but an integer
        str(I64_MAX),
        str(I64_MIN),
    ],
)
def test_representable_values_are_written_exactly(text: str) -> None:
    value = Decimal(text)
    assert representable(value)
    denoted, integer_literal = written(value)
    assert denoted == value
    if value == value.to_integral_value():
        assert integer_literal


@pytest.mark.parametrize(
    "text",
    [
        str(2**63),  # would be written as a float
        str(2**64 + 1),
        "1e20",  # integral beyond 64 bits: written as 1e20, a float
        "-9223372036854775809",
        "1.7e308",
        "3.4e308",  # 1.7e308 x 2: the float is infinite, written as null
        "0.1000000000000000001",
        "1.00000000000000000001",  # 1 + 1e-20
        "9007199254740992.5",  # 2^53 + 0.5: no double has a fraction there
        "1e-400",  # rounds to 0.0
        "1.23456789012345e-320",  # subnormal: 15 digits do not survive
        "Infinity",
        "NaN",
    ],
)
def test_unrepresentable_values(text: str) -> None:
    assert not representable(Decimal(text))


DECIMALS = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=2, max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False).map(to_decimal),
    st.integers(min_value=-(2**66), max_value=2**66).map(Decimal),
    # Sums of doubles: the case that produces 16-18 digit totals.
    st.tuples(
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e20, max_value=1e20),
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e20, max_value=1e20),
    ).map(lambda pair: to_decimal(pair[0]) + to_decimal(pair[1])),
)


@settings(max_examples=2000, deadline=None)
@given(DECIMALS)
def test_representable_matches_its_definition(value: Decimal) -> None:
    assert representable(value) == reference(value)


@settings(max_examples=2000, deadline=None)
@given(DECIMALS)
def test_representable_means_written_exactly_and_integers_fit_64_bits(value: Decimal) -> None:
    denoted, integer_literal = written(value)
    integral = value == value.to_integral_value()
    exact_and_typed = denoted == value and (integer_literal or not integral)
    if integral and integer_literal:
        assert I64_MIN <= denoted <= I64_MAX
    assert representable(value) == exact_and_typed


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what orjson yields as int
        st.sampled_from(
            [2.0**63, -(2.0**63), 2.0**63 - 1024, 2**63, 2**63 - 1, -(2**63), -(2**63) - 1]
        ),
    )
)
def test_json_money_is_representable_of_the_decoded_number(value: int | float) -> None:
    money = json_money(value)
    assert (money is not None) == representable(to_decimal(value))
    if money is not None:
        assert money == to_decimal(value)
    # The decoder's inlined fast path uses the same bounds.
    in_range = (
        -MONEY_LIMIT_FLOAT < value < MONEY_LIMIT_FLOAT
        if type(value) is float
        else -MONEY_LIMIT <= value < MONEY_LIMIT
    )
    assert in_range == (money is not None)


def number_by_definition(value: Decimal) -> int | float:
    """json_number's docstring, without its cache."""
    if value == value.to_integral_value() and I64_MIN <= value <= I64_MAX:
        return int(value)
    return float(value)


@settings(max_examples=3000, deadline=None)
@given(st.lists(DECIMALS, min_size=1, max_size=8))
def test_json_number_answers_from_its_cache_as_by_its_definition(values: list[Decimal]) -> None:
    # Each value also in another form of the same number (2.0 and 2, -0 and 0),
    # asked for after it: the cache answers for the value, never the form.
    for value in values:
        for form in (value, value.normalize(), -value, value + Decimal("0.00")):
            number = json_number(form)
            expected = number_by_definition(form)
            assert (type(number), number) == (type(expected), expected)


def test_json_number_stays_right_after_its_cache_is_emptied() -> None:
    values = [Decimal(n) / 4 for n in range(10_000)]  # more than the cache holds
    for _ in range(2):
        assert [json_number(v) for v in values] == [number_by_definition(v) for v in values]
