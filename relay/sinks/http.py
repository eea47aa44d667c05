"""`kind: http`: POST the envelope as JSON; 2xx is done, anything else is retried."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp

from relay.config import HttpSinkConfig
from relay.models import Delivery
from relay.sinks.base import DONE, Outcome


class HttpSink:
    def __init__(self, name: str, config: HttpSinkConfig) -> None:
        self.name = name
        self.config = config
        self.batch_size = 1
        self.concurrency = config.concurrency
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.concurrency),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            headers={"User-Agent": "relay"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._post(d) for d in batch)))

    async def _post(self, delivery: Delivery) -> Outcome:
        if self._session is None:
            raise RuntimeError("HttpSink.send before start")
        headers = {
            **{k: v.get_secret_value() for k, v in self.config.headers.items()},
            "Content-Type": "application/json",
            # The stable event id, identical on every retry, lets the receiver dedupe.
            "webhook-id": delivery.event_id,
            "Idempotency-Key": delivery.event_id,
        }
        try:
            async with self._session.post(
                self.config.url, data=delivery.envelope.encode("utf-8"), headers=headers
            ) as response:
                if 200 <= response.status < 300:
                    return DONE
                body = (await response.content.read(200)).decode("utf-8", "replace")
                return Outcome(
                    "retry", status=response.status, error=f"HTTP {response.status}: {body}"
                )
        except aiohttp.InvalidURL:
            # Its message would echo the URL, which may embed a secret.
            return Outcome("dead", error="invalid url")
        except TimeoutError:
            return Outcome("retry", error=f"timed out after {self.config.timeout:g}s")
        except aiohttp.ClientError as exc:
            # Connection errors name host and port, never the path or query string.
            return Outcome("retry", error=f"{exc.__class__.__name__}: {exc}")
