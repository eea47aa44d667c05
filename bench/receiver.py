"""A fast local receiver for relay's HTTP sink: counts unique `webhook-id`s.

A bare asyncio protocol (no framework: it must not be the bottleneck), HTTP/1.1
keep-alive, answering every POST with 204. `GET /stats` answers JSON: `unique` ids,
`total` POSTs (unique + repeats), `missing_id` (POSTs without a `webhook-id`), and
`first_at` / `last_new_at`, the time.monotonic() (system-wide on Linux, so comparable
with the caller's) of the first POST and of the last POST that brought a new id.
`POST /reset` forgets everything.

    python bench/receiver.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

STATE: dict[str, object] = {}
SEEN: set[bytes] = set()
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


def reset() -> None:
    SEEN.clear()
    STATE.update(total=0, missing_id=0, first_at=None, last_new_at=None, bad=0)


class Receiver(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buffer[:end]).split(b"\r\n")
            length, event_id, chunked = 0, None, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"webhook-id":
                    event_id = value.strip()
                elif name == b"transfer-encoding":
                    chunked = True
            if chunked:  # aiohttp sends a bytes body with a Content-Length
                STATE["bad"] = int(STATE["bad"]) + 1  # type: ignore[call-overload]
                self.transport.close()
                return
            if len(buffer) < end + 4 + length:
                return
            del buffer[: end + 4 + length]
            self.answer(lines[0], event_id)

    def answer(self, request_line: bytes, event_id: bytes | None) -> None:
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0]
        if method == b"GET" and path == b"/stats":
            body = json.dumps({**STATE, "unique": len(SEEN)}).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.transport.close()
            return
        if path == b"/reset":
            reset()
            self.transport.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            self.transport.close()
            return
        now = time.monotonic()
        if STATE["first_at"] is None:
            STATE["first_at"] = now
        STATE["total"] = int(STATE["total"]) + 1  # type: ignore[call-overload]
        if event_id is None:
            STATE["missing_id"] = int(STATE["missing_id"]) + 1  # type: ignore[call-overload]
        elif event_id not in SEEN:
            SEEN.add(event_id)
            STATE["last_new_at"] = now
        self.transport.write(NO_CONTENT)


async def main(port: int) -> None:
    reset()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Receiver, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
