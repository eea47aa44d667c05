"""A real redis-server for the tests, never a fake: started once per session on a free
port of 127.0.0.1, persisting nothing, and stopped at the end; and, for the tests that
stop and start Redis under a running relay, one of a test's own with AOF on.

Without redis-server on PATH the tests that need it are skipped, visibly; with
RELAY_REQUIRE_REDIS=1 (CI) they fail instead, so a missing server cannot pass for green.
"""

from __future__ import annotations

import os
import shutil
import signal
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


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server is not installed (or not on PATH)")
    return binary


def _spawn(binary: str, port: int, folder: Path, *persistence: str) -> subprocess.Popen[bytes]:
    """redis-server on `port`, its files and log in `folder`; fails the test unless it
    answers PING within 10 s."""
    log = folder / "redis.log"
    process = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            *persistence,
            "--dir", str(folder),
            "--maxmemory", MAXMEMORY,
            "--logfile", str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 10.0
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            _end(process)
            detail = log.read_text()[-2000:] if log.exists() else ""
            # Installed but broken is a failure, not a reason to skip.
            pytest.fail(f"redis-server did not start on port {port}: {detail}")
        time.sleep(0.02)
    return process


def _end(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server of this session's own."""
    binary = _binary()
    folder: Path = tmp_path_factory.mktemp("redis")
    port = _free_port()
    process = _spawn(binary, port, folder, "--save", "", "--appendonly", "no")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _end(process)


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster of this session's own: three masters on free ports, slots spread
    by `redis-cli --cluster create`. The URL names one node: relay must follow the
    cluster to whichever node owns its prefix's slot."""
    binary = _binary()
    cli = shutil.which("redis-cli")
    if cli is None:
        _missing("redis-cli is not installed (or not on PATH)")
    ports = [_free_port() for _ in range(3)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            folder: Path = tmp_path_factory.mktemp(f"redis-cluster-{port}")
            # The bus port is set: the default, port + 10000, may be past 65535.
            cluster = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(_free_port()),
            )  # fmt: skip
            processes.append(
                _spawn(binary, port, folder, "--save", "", "--appendonly", "no", *cluster)
            )
        nodes = [f"127.0.0.1:{p}" for p in ports]
        created = subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        deadline = time.monotonic() + 10.0
        while not all(_cluster_ok(cli, port) for port in ports):
            if time.monotonic() > deadline:
                pytest.fail("the Redis Cluster did not become ready within 10 s")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for process in processes:
            _end(process)


def _cluster_ok(cli: str, port: int) -> bool:
    info = subprocess.run(
        [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5
    )
    return "cluster_state:ok" in info.stdout


class RestartableRedis:
    """A redis-server of one test's own that the test stops and starts again: the same
    port and folder each time, with AOF on and fsynced at every write (`appendfsync
    always`), so that what Redis acknowledged survives even a kill -9 of Redis."""

    PERSISTENCE = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")

    def __init__(self, binary: str, folder: Path, port: int) -> None:
        self.binary = binary
        self.folder = folder
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start it (again), and wait until it answers: it has loaded its AOF by then."""
        if self.running:
            raise RuntimeError("this redis-server is running already")
        self.process = _spawn(self.binary, self.port, self.folder, *self.PERSISTENCE)

    def stop(self, *, kill: bool = False) -> None:
        """Stop it: SIGTERM (a clean shutdown), or with `kill` SIGKILL, as a crash."""
        if self.process is not None:
            _end(self.process, signal.SIGKILL if kill else signal.SIGTERM)
            self.process = None


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    """A started RestartableRedis in this test's tmp_path (under `redis/`), stopped at
    the end. Skips, or with RELAY_REQUIRE_REDIS=1 fails, as `redis_url` does."""
    binary = _binary()
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RestartableRedis(binary, folder, _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def fresh_prefix() -> str:
    """A key prefix no other test uses: tests share the server, never each other's keys."""
    return f"test-{uuid.uuid4().hex[:16]}"
