"""Helpers shared by the bench scripts: what machine and what code a run is on, process
CPU time from /proc, relay's counters from /metrics, a local receiver for HTTP sinks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """CPU model, cores, kernel, Python, redis-server and wrk versions, in one line."""
    models, cpus = set(), 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            models.add(value.strip())
        elif key.strip() == "processor":
            cpus += 1
    parts = [
        f"{cpus} cores ({', '.join(sorted(models)) or 'unknown CPU'})",
        f"Linux {platform.release()}",
        f"Python {platform.python_version()}",
    ]
    if shutil.which("redis-server"):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        match = re.search(r"v=(\S+)", out)
        parts.append(f"redis-server {match.group(1) if match else out.strip()}")
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
        parts.append(first.split(" [")[0] or "wrk")
    return "; ".join(parts)


def snapshot_code(into: Path) -> tuple[Path, str]:
    """Copy relay/ as it is now (work tree, uncommitted changes included) to `into`, so
    that edits made while the benchmark runs do not change the code under test halfway.
    Returns the folder to put on PYTHONPATH and a description of the code."""
    shutil.copytree(ROOT / "relay", into / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    return into, describe_tree(ROOT)


def describe_tree(root: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    diff = git("diff", "HEAD", "--", "relay")
    if not diff:
        return f"{head} (relay/ as committed)"
    files = len(git("diff", "HEAD", "--name-only", "--", "relay").splitlines())
    digest = hashlib.sha256(diff.encode()).hexdigest()[:10]
    return f"{head} + uncommitted changes to {files} file(s) in relay/ (diff sha256 {digest})"


def wait_for_lines(path: Path, wanted: float, within: float = 30.0) -> int:
    """Lines in `path` (a file sink's output) once it holds `wanted`, or after `within`
    seconds; reads only what was added since the last look."""
    deadline, lines, read = time.monotonic() + within, 0, 0
    while time.monotonic() < deadline:
        if path.exists():
            with path.open("rb") as f:
                f.seek(read)
                chunk = f.read()
            read += len(chunk)
            lines += chunk.count(b"\n")
        if lines >= wanted:
            break
        time.sleep(0.05)
    return lines


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) and of its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
    return sum(int(f) for f in fields[11:15]) / TICK


def machine_ticks() -> tuple[int, int, int]:
    """(all, busy, steal) jiffies summed over the machine's cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total, total - idle - iowait - steal, steal


def shares(
    before: tuple[int, int, int], after: tuple[int, int, int], ours: float
) -> dict[str, float]:
    """Of the machine's CPU time between two machine_ticks(): the busy share, the share
    stolen by the hypervisor, and the share other processes took (busy minus `ours`,
    the CPU seconds of the processes the benchmark knows of)."""
    total, busy, steal = (b - a for a, b in zip(before, after, strict=True))
    if total <= 0:
        return {"busy": 0.0, "steal": 0.0, "others": 0.0}
    return {
        "busy": busy / total,
        "steal": steal / total,
        "others": max(busy / TICK - ours, 0.0) / (total / TICK),
    }


def log_events(lines: list[str]) -> dict[str, int]:
    """relay's JSON log lines counted by level and event name."""
    found: dict[str, int] = {}
    for line in lines:
        try:
            record = json.loads(line.split(": ", 1)[1] if not line.startswith("{") else line)
            key = f"{record.get('level', '?')} {record.get('event', '?')}"
        except (ValueError, IndexError, AttributeError):
            key = "unparsed: " + line[:120]
        found[key] = found.get(key, 0) + 1
    return found


def scrape(port: int) -> dict[str, float]:
    """relay's /metrics as {name{labels}: value}, counters only."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "_total" not in line:
            continue
        name, _, value = line.rpartition(" ")
        found[name] = float(value)
    return found


def counted(metrics: dict[str, float], name: str, label: str = "") -> float:
    """Sum of a counter's series, those whose labels contain `label` if given."""
    return sum(
        v for k, v in metrics.items() if k.split("{")[0] == name and (not label or label in k)
    )


@dataclass
class Counting:
    """What `counting_receiver` saw: POSTs received, when the first came, all arrived."""

    url: str = ""
    received: int = 0
    first_at: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def rate(self, events: int) -> float:
        """Events a second from the first POST (relay's start-up is not the sink's
        speed) until `done`."""
        return (events - 1) / (time.monotonic() - self.first_at)


@asynccontextmanager
async def counting_receiver(events: int) -> AsyncIterator[Counting]:
    """A local aiohttp app at `url` answering every POST 204; `done` is set once it has
    had `events` of them."""
    seen = Counting()

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        seen.received += 1
        if seen.received == 1:
            seen.first_at = time.monotonic()
        if seen.received >= events:
            seen.done.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/events", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    seen.url = f"http://127.0.0.1:{runner.addresses[0][1]}/events"
    try:
        yield seen
    finally:
        await runner.cleanup()


@contextmanager
def relay_serving(workdir: Path, code: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`relay serve` on `workdir/relay.yaml` (any free port), running `code`'s relay,
    stopped with SIGTERM on leaving."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", "relay.yaml", "--port", "0"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(code)},
        stdout=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
