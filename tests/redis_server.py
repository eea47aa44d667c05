"""A real redis-server for the tests, never a fake: started once per session on a free
port of 127.0.0.1, persisting nothing, and stopped at the end.

Without redis-server on PATH the tests that need it are skipped, visibly; with
RELAY_REQUIRE_REDIS=1 (CI) they fail instead, so a missing server cannot pass for green.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

# Large enough never to fill, set so that health() has a maxmemory to measure against.
MAXMEMORY = "1gb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _missing(reason: str) -> NoReturn:
    if os.environ.get("RELAY_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason}, and RELAY_REQUIRE_REDIS=1 requires it")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server of this session's own."""
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server is not installed (or not on PATH)")
    folder: Path = tmp_path_factory.mktemp("redis")
    port = _free_port()
    log = folder / "redis.log"
    process = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(folder),
            "--maxmemory", MAXMEMORY,
            "--logfile", str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10.0
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                detail = log.read_text()[-2000:] if log.exists() else ""
                # Installed but broken is a failure, not a reason to skip.
                pytest.fail(f"redis-server did not start on port {port}: {detail}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fresh_prefix() -> str:
    """A key prefix no other test uses: tests share the server, never each other's keys."""
    return f"test-{uuid.uuid4().hex[:16]}"
