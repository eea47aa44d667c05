"""relay: a durable relay for QingStor bucket notifications."""

__version__ = "0.1.0"
