"""Exact decimal money arithmetic, its JSON form, and what that form can carry.

Input: orjson parses JSON numbers to ``int`` (integer literals within
-2^63..2^64-1) or ``float`` (everything else). A float is turned into a
Decimal through ``repr`` (the shortest string that round-trips), which
recovers the number as written for up to 15 significant digits (always) and
up to 17 when the written text was itself the shortest form. So prices such
as ``0.1`` or ``19.99`` are exactly 0.1 and 19.99, never binary fractions.
What was lost while parsing (an integer literal beyond 2^64, a 20-digit
decimal, ``1e-400`` read as 0) cannot be seen here; this module works on the
number as decoded.

Arithmetic: sums and products use :data:`EXACT` (1000 digits of precision),
which is exact for every value reachable from JSON doubles and 64-bit
quantities over 1000 lines (the widest span is about 660 digits).

Output: :func:`json_number` emits an ``int`` when the value is integral and
fits 64 bits, otherwise ``float(value)``, which orjson prints in its
shortest form (a total of 0.1 + 0.2 prints as ``0.3``).

Representable money values (the contract for every price, cost, total and
returned value the processor emits). A decimal ``v`` is *representable* when
the JSON number :func:`json_number` writes for it is exactly ``v``:

- ``-2^63 <= v < 2^63`` (so an integral value is always written as a signed
  64-bit integer, never as a float such as ``1e+20``), and
- ``v`` is an integer, or ``v`` is the shortest round-trip decimal of the
  double nearest to it (``Decimal(repr(float(v))) == v``), so the float
  written prints as exactly ``v``.

In practice: every decimal with at most 15 significant digits, magnitude
below 2^63 (about 9.22e18) and either zero or at least 1e-307 is
representable; so is every integer in the signed 64-bit range; a
non-integer with 16 or 17 significant digits is representable only if it is
the shortest form of its double (``0.30000000000000004`` is, ``0.1000000000000000001``
is not); nothing with 18 or more significant digits after the point is.

A number decoded from JSON (:func:`json_money`) is representable exactly
when it lies in ``[-2^63, 2^63)`` for an int and in ``(-2^63, 2^63)`` for a
float: a non-integral float's shortest repr is by construction the decimal
it stands for, an integral one is an integer, and the one double excluded,
-2^63, has the shortest repr -9223372036854776000, which is below -2^63.
So the decoder's check is a range check (:data:`MONEY_LIMIT`,
:data:`MONEY_LIMIT_FLOAT`), which it inlines on its hot path; sums and
products of representable values need not be representable (``1 + 1e-20``),
so computed totals go through :func:`representable`.
"""

from __future__ import annotations

from decimal import Context, Decimal
from typing import Final

__all__ = [
    "EXACT",
    "MONEY_LIMIT",
    "MONEY_LIMIT_FLOAT",
    "ZERO",
    "json_money",
    "json_number",
    "representable",
    "to_decimal",
]

#: The context of exact arithmetic (see above); apply makes it current for its call.
EXACT: Final = Context(prec=1000, Emax=999_999, Emin=-999_999)
ZERO: Final = Decimal(0)
_I64: Final = 1 << 63

#: Money values lie in ``[-MONEY_LIMIT, MONEY_LIMIT)``: the signed 64-bit range.
MONEY_LIMIT: Final = _I64
#: :data:`MONEY_LIMIT` as a float (2^63 is a double exactly), for comparing floats.
MONEY_LIMIT_FLOAT: Final = float(_I64)

_LIMIT: Final = Decimal(_I64)
_NEGATIVE_LIMIT: Final = -_LIMIT
# Rounding to 15 digits leaves a value unchanged exactly when it has at most
# 15 significant digits; those survive decimal -> double -> shortest repr
# unchanged (DBL_DIG) when the double is normal (magnitude >= ~2.2e-308).
# traps=[]: rounding only sets this private context's sticky flags.
_DBL_DIG: Final = Context(prec=15, traps=[])
_QUICK_ADJUSTED: Final = range(-307, 18)  # 1e-307 <= |v| < 1e18 < 2^63


def to_decimal(value: int | float) -> Decimal:
    """The decimal a JSON number was written as (see module docstring)."""
    if type(value) is int:
        return Decimal(value)
    return Decimal(repr(value))


def json_money(value: int | float) -> Decimal | None:
    """The exact decimal of a decoded JSON number, or ``None`` if not representable.

    Equivalent to ``representable(to_decimal(value))`` (see module docstring),
    computed as a range check.
    """
    if type(value) is int:
        return Decimal(value) if -_I64 <= value < _I64 else None
    # Not -2^63 itself: that double's shortest repr, -9223372036854776000, is below it.
    if -MONEY_LIMIT_FLOAT < value < MONEY_LIMIT_FLOAT:
        return Decimal(repr(value))
    return None


def representable(value: Decimal) -> bool:
    """Whether :func:`json_number` writes exactly ``value`` (see module docstring)."""
    if value.is_zero():
        return True  # an integer (and common: a cart without additional costs)
    if not value.is_finite():
        return False
    if value.adjusted() in _QUICK_ADJUSTED and _DBL_DIG.plus(value) == value:
        return True  # at most 15 significant digits, normal range, below 2^63
    if not _NEGATIVE_LIMIT <= value < _LIMIT:
        return False
    if value == value.to_integral_value():
        return True
    return Decimal(repr(float(value))) == value


def json_number(value: Decimal) -> int | float:
    """The JSON number for ``value``: int when integral (64-bit), else float.

    Exactly ``value`` when ``value`` is :func:`representable`; the domain
    never stores a money value or total that is not.
    """
    # Prices repeat (a catalog's), and converting a Decimal costs ~0.5 us.
    # Equal decimals (2.0 and 2) have equal hashes and the same JSON number.
    number = _NUMBERS.get(value)
    if number is None:
        integral = int(value)
        number = integral if integral == value and -_I64 <= integral < _I64 else float(value)
        if len(_NUMBERS) >= _NUMBERS_CACHED:
            _NUMBERS.clear()
        _NUMBERS[value] = number
    return number


_NUMBERS: Final[dict[Decimal, int | float]] = {}
_NUMBERS_CACHED: Final = 4096
