"""`kind: qingstor`: the notify_url target for notifier, tupu-porn and image results."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ValidationError

from relay.config import QingStorSourceConfig
from relay.errors import InvalidBody
from relay.models import (
    Envelope,
    NotifierBatch,
    TupuPornResult,
    image_envelope,
    notifier_envelopes,
    tupu_porn_envelope,
)
from relay.sources.base import (
    JsonBody,
    RequestMeta,
    check_peer,
    check_token,
    describe,
    looks_like,
)


class QingStorSource(JsonBody):
    batch_key = "events"

    def __init__(self, name: str, config: QingStorSourceConfig) -> None:
        self.name = name
        self.config = config
        self.authenticates = config.authenticates

    def authenticate(self, meta: RequestMeta) -> None:
        check_peer(self.name, self.config.allow_ips, meta)
        check_token(self.config.token, meta)

    def verify(self, meta: RequestMeta, body: bytes, now: float) -> None:
        """QingStor does not sign its POSTs; the token was checked in authenticate()."""

    def parse(self, meta: RequestMeta, document: Any, received_at: datetime) -> list[Envelope]:
        if not isinstance(document, dict):
            raise InvalidBody(
                "expected a JSON object (a notifier batch or a tupu-porn result)",
                code="not_an_event",
            )
        cloudfunc = self.config.cloudfunc
        if cloudfunc == "image":
            return [image_envelope(document, self.name, received_at)]
        if "events" in document and cloudfunc in (None, "notifier"):
            try:
                batch = NotifierBatch.model_validate(document)
            except ValidationError as exc:
                raise InvalidBody(describe(exc), code="invalid_event") from None
            return notifier_envelopes(document, batch, self.name, received_at)
        if "result" in document and cloudfunc in (None, "tupu-porn"):
            try:
                result = TupuPornResult.model_validate(document)
            except ValidationError as exc:
                raise InvalidBody(describe(exc), code="invalid_event") from None
            return [tupu_porn_envelope(document, result, self.name, received_at)]
        expected = {
            None: 'a notifier batch {"events": [...]} or a tupu-porn result',
            "notifier": 'a notifier batch {"events": [...]}',
            "tupu-porn": 'a tupu-porn result {"bucket", "object", "result"}',
        }[cloudfunc]
        seen = looks_like(document)
        hint = f"; this is {seen}" if seen and "QingStor" not in seen else ""
        raise InvalidBody(f"not a QingStor event: expected {expected}{hint}", code="not_an_event")
