"""Sinks: one file per kind behind the Sink protocol, and the registry of kinds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.sinks.base import DONE, Outcome, Sink
from relay.sinks.file import FileSink
from relay.sinks.http import HttpSink
from relay.sinks.slack import SlackSink

# kind -> class; each class takes (name, its validated config section).
SINKS: dict[str, Callable[[str, Any], Sink]] = {
    "file": FileSink,
    "http": HttpSink,
    "slack": SlackSink,
}


def build_sink(name: str, config: Any) -> Sink:
    return SINKS[config.kind](name, config)


__all__ = ["DONE", "SINKS", "Outcome", "Sink", "build_sink"]
