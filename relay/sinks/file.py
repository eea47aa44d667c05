"""`kind: file`: one JSON envelope per line, appended and fsynced before it counts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from relay.config import FileSinkConfig
from relay.models import Delivery
from relay.sinks.base import DONE, Outcome


class FileSink:
    batch_size = 512
    concurrency = 1  # one writer keeps lines whole and in order
    # Under a steady stream, one fsync per 10 ms rather than one per ingest commit.
    linger = 0.01
    paced = False

    def __init__(self, name: str, config: FileSinkConfig) -> None:
        self.name = name
        self.path = config.path

    async def start(self) -> None:
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        pass

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        try:
            await asyncio.to_thread(self._append, [d.envelope for d in batch])
        except OSError as exc:
            return [Outcome("retry", error=f"{exc.__class__.__name__}: {exc.strerror}")] * len(
                batch
            )
        return [DONE] * len(batch)

    def _append(self, lines: list[str]) -> None:
        # Opened per batch so that log rotation (rename + new file) needs no signal.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
