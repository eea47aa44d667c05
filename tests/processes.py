"""Running `relay` as a real process in tests: start, signal, read its JSON log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession

from tests.conftest import eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess:
    """`python -m relay serve` in a folder, its JSON log in a file."""

    def __init__(self, workdir: Path, config: dict[str, Any] | None) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"relay-{time.monotonic_ns()}.log"
        self.args = [sys.executable, "-m", "relay", "serve", "--host", "127.0.0.1", "--port", "0"]
        if config is not None:
            path = workdir / "relay.yaml"
            path.write_text(yaml.safe_dump(config))
            self.args += ["--config", str(path)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # extra environment for the process
        self.port = 0

    async def start(self) -> RelayProcess:
        self.proc = self._spawn()
        listening = await eventually(lambda: self._find("relay.listening"), within=20)
        self.port = listening["port"]
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
        # Unbuffered, as our image runs it: the way log lines from workers could split.
        env = env | {"PYTHONUNBUFFERED": "1"} | self.env
        with self.log_path.open("wb") as log:
            return subprocess.Popen(
                self.args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"event": "<not json>", "text": line})
        return lines

    def _find(self, event: str) -> dict[str, Any] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            output = self.log_path.read_text()
            raise AssertionError(f"relay exited {self.proc.returncode}: {output}")
        return next((e for e in self.logs() if e.get("event") == event), None)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, within: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(within)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def processes():
    started: list[RelayProcess] = []

    def make(workdir: Path, config: dict[str, Any] | None) -> RelayProcess:
        process = RelayProcess(workdir, config)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


async def post(url: str, body: Any) -> tuple[int, Any]:
    async with ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
