"""Exact decimal money arithmetic and its JSON form.

Input: orjson parses JSON numbers to ``int`` or ``float``. A float is turned
into a Decimal through ``repr`` (the shortest string that round-trips), which
recovers the number as written for up to 15 significant digits (always) and
up to 17 when the written text was itself the shortest form. So prices such
as ``0.1`` or ``19.99`` are exactly 0.1 and 19.99, never binary fractions.

Arithmetic: sums and products use :data:`EXACT` (1000 digits of precision),
which is exact for every value reachable from JSON doubles and 64-bit
quantities over 1000 lines (the widest span is about 660 digits).

Output: :func:`json_number` emits an ``int`` when the value is integral and
fits 64 bits, otherwise ``float(value)``; orjson prints the shortest repr of
a float, so a total of 0.1 + 0.2 prints as ``0.3``. A float has ~15-17
significant digits: a total that needs more (say 1e20 + 0.01) is emitted
rounded to the nearest double, while the stored form keeps it exactly.
"""

from __future__ import annotations

from decimal import Context, Decimal, localcontext
from typing import Final

__all__ = ["EXACT", "ZERO", "exact", "json_number", "to_decimal"]

EXACT: Final = Context(prec=1000, Emax=999_999, Emin=-999_999)
ZERO: Final = Decimal(0)
_I64: Final = 1 << 63


def to_decimal(value: int | float) -> Decimal:
    """The decimal a JSON number was written as (see module docstring)."""
    if type(value) is int:
        return Decimal(value)
    return Decimal(repr(value))


def json_number(value: Decimal) -> int | float:
    """The JSON number for ``value``: int when integral (64-bit), else float."""
    integral = int(value)
    if integral == value and -_I64 <= integral < _I64:
        return integral
    return float(value)


exact = localcontext
"""``with exact(EXACT): ...`` runs decimal arithmetic exactly."""
