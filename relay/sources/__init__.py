"""Source adapters: one file per kind, each turning an authenticated request into envelopes.

A source never touches the network or the store: ingest hands it what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.sources.base import RequestMeta, Source
from relay.sources.cloudevents import CloudEventsSource
from relay.sources.generic import GenericSource
from relay.sources.hmac_header import HmacSource
from relay.sources.qingstor import QingStorSource
from relay.sources.s3 import S3Source
from relay.sources.standard_webhooks import StandardWebhooksSource

# kind -> class; each class takes (name, its validated config section).
SOURCES: dict[str, Callable[[str, Any], Source]] = {
    "qingstor": QingStorSource,
    "standard-webhooks": StandardWebhooksSource,
    "hmac": HmacSource,
    "generic": GenericSource,
    "s3": S3Source,
    "cloudevents": CloudEventsSource,
}


def build_source(name: str, config: Any) -> Source:
    return SOURCES[config.kind](name, config)


__all__ = ["SOURCES", "RequestMeta", "Source", "build_source"]
