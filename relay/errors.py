"""Errors that carry their HTTP answer, so the ingest path maps failures in one place."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


class RelayError(Exception):
    """Base class for relay's own errors."""


class ConfigError(RelayError):
    """The configuration is invalid; `problems` lists each one as `path: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class IngestError(RelayError):
    """A request that relay refuses; becomes `{"error": code, "message": message}`."""

    status = 400
    code = "bad_request"
    # Extra headers for the answer, e.g. WWW-Authenticate on a 401 asking for credentials.
    headers: Mapping[str, str] = MappingProxyType({})
    # Refused with the body unread, or unreadable: the connection cannot be reused.
    closes_connection = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidBody(IngestError):
    status = 400
    code = "invalid_body"


class Unauthorized(IngestError):
    status = 401
    code = "unauthorized"


class Forbidden(IngestError):
    status = 403
    code = "forbidden"


class UnknownSource(IngestError):
    status = 404
    code = "unknown_source"


class BodyTooLarge(IngestError):
    status = 413
    code = "body_too_large"
    closes_connection = True


class UndecodableBody(InvalidBody):
    """A body that is not in the Content-Encoding it declares."""

    code = "invalid_body"
    closes_connection = True


class SenderGone(IngestError):
    """The sender closed the connection before its body was all there: nobody is left
    to answer, and nothing was stored. Its own code, so it is counted apart from the
    senders that wait for their 400."""

    status = 400
    code = "incomplete_body"
    closes_connection = True


class RequestTimeout(IngestError):
    status = 408
    code = "request_timeout"
    closes_connection = True


class TooManyRecords(IngestError):
    status = 413
    code = "too_many_records"


class Overloaded(IngestError):
    """More hooks in flight than `server.max_concurrent`: the sender retries later."""

    status = 503
    code = "overloaded"
    headers = MappingProxyType({"Retry-After": "1"})
    closes_connection = True


class QueueFull(IngestError):
    """A sink's queue on disk is at its `max_queue`: take no more for it until it drains."""

    status = 503
    code = "queue_full"
    headers = MappingProxyType({"Retry-After": "5"})


class UnsupportedMediaType(IngestError):
    status = 415
    code = "unsupported_media_type"


class ListenError(RelayError):
    """relay could not listen where it was told to; `reason` is the OS's errno, if any."""

    def __init__(self, host: str, port: int, reason: int | None, detail: str) -> None:
        self.host, self.port, self.reason = host, port, reason
        super().__init__(f"cannot listen on {host}:{port}: {detail}")


class StoreUnavailable(RelayError):
    """The store could not persist; ingest answers 503 so the sender retries."""


class StoreNotWritable(StoreUnavailable):
    """The store's disk takes no writes now: it is full, or mounted read-only. A relay
    starting on it listens anyway, answers 503 and waits for the disk (relay.app)."""

    def __init__(self, path: str, *, free_bytes: int | None, read_only: bool, cause: str) -> None:
        self.path, self.free_bytes, self.read_only, self.cause = path, free_bytes, read_only, cause
        state = "is mounted read-only" if read_only else f"has {free_bytes} bytes free"
        super().__init__(f"the disk of the store at {path} {state}: {cause}")


class StoreTooNew(StoreUnavailable):
    """The store's schema is newer than this relay knows: a newer relay wrote it."""


class StoreNeedsUpgrade(StoreUnavailable):
    """The store's schema is older than this relay's, and this open may not migrate it:
    only the server, holding the store's lock, does."""
