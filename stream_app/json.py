"""The one JSON module: orjson with fixed options, bytes in and bytes out."""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["JSONDecodeError", "JSONEncodeError", "dumps", "loads"]

JSONDecodeError = orjson.JSONDecodeError
#: What :func:`dumps` raises for a value JSON cannot hold as orjson writes it (an
#: integer beyond 64 bits, a string that is not Unicode): a ``TypeError``.
JSONEncodeError = orjson.JSONEncodeError

# Non-str dict keys are a programming error here, never silently coerced.
_OPTIONS = 0


def dumps(value: Any) -> bytes:
    """Serialise ``value`` to compact UTF-8 JSON bytes; raises :class:`JSONEncodeError`."""
    return orjson.dumps(value, option=_OPTIONS)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON; raises :class:`JSONDecodeError` (a ``ValueError``) on bad input."""
    return orjson.loads(data)
