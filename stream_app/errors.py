"""The root of every exception this package raises.

Rejected commands are *values* (see ``stream_app.domain``), never exceptions:
these classes are for faults of configuration and infrastructure.
"""

from __future__ import annotations


class StreamAppError(Exception):
    """Root exception of stream_app."""


class ConfigurationError(StreamAppError):
    """Settings or application settings that cannot be used."""


class StoreError(StreamAppError):
    """A state store could not be opened, read, written or closed."""
