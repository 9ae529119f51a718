"""Customer-session stream processor (Talon.One customer sessions on Kafka)."""

__version__ = "0.1.0"
